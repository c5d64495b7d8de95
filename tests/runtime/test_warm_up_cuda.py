"""On CUDA, a compiled engine after warm_up: a mixed workload captures no CUDA graph and compiles nothing."""

import pytest
import torch

from lorafast_export.runtime.engine import Engine
from tests.runtime.helpers import paged, tiny_checkpoint

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def test_compiled_engine_after_warm_up_captures_and_compiles_nothing(tmp_path):
    from torch._dynamo.utils import counters

    md = tiny_checkpoint(tmp_path)
    pm, cache = paged(md, num_blocks=96, block_size=16, dtype=torch.bfloat16, device="cuda")
    eng = Engine(
        pm, cache, max_batch=8, max_seq_len=256, batch_buckets=(1, 2, 8), compile=True, device="cuda"
    )
    eng.warm_up()
    runners = {"greedy": eng.greedy_fn, "prefill": eng.prefill_graph}
    graphs = {n: len(r.graphs) for n, r in runners.items()}
    assert graphs == {"greedy": 3 * len(eng.widths()), "prefill": len(eng.prefill_graph_lengths())}
    compiled = dict(counters["stats"])
    g = torch.Generator().manual_seed(0)
    lens = torch.randint(2, 180, (12,), generator=g).tolist()
    prompts = [torch.randint(0, 96, (n,), generator=g).tolist() for n in lens]
    news = torch.randint(1, 60, (12,), generator=g).tolist()
    for p, n in zip(prompts[:5], news[:5], strict=True):  # some now, the rest while they decode
        eng.add(p, n)
    for _ in range(3):
        eng.step()
    outs = eng.generate_batch(prompts[5:], news[5:])
    assert [len(o) for o in outs] == news[5:]
    assert {n: len(r.graphs) for n, r in runners.items()} == graphs
    assert dict(counters["stats"]) == compiled
