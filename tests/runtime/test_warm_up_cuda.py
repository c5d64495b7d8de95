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


def test_engine_with_a_paused_draft_after_warm_up_compiles_nothing(tmp_path, monkeypatch):
    """speculation auto with a draft that never agrees: probe rounds, plain bursts, a long catch-up of the draft
    when it is tried again, all at shapes warm_up ran: no graph captured and nothing compiled afterwards. (The
    pauses' cost floor is off, so that the draft is tried again within these outputs.)"""
    from torch._dynamo.utils import counters

    from lorafast_export.runtime import speculation

    monkeypatch.setattr(speculation, "MAX_COST_PAUSE", 0)

    from tests.runtime.helpers import fp_state

    md = tiny_checkpoint(tmp_path / "m")
    other = tiny_checkpoint(tmp_path / "o", seed=7)
    pm, cache = paged(md, num_blocks=96, block_size=16, dtype=torch.bfloat16, device="cuda")
    draft, dcache = paged(
        other, fp_state(other), num_blocks=96, block_size=16, dtype=torch.bfloat16, device="cuda"
    )
    eng = Engine(
        pm,
        cache,
        max_batch=4,
        max_seq_len=256,
        batch_buckets=(1, 2, 4),
        compile=True,
        device="cuda",
        draft=draft,
        draft_cache=dcache,
        spec_k=3,
        decode_steps=8,
        speculation="auto",
    )
    eng.warm_up()
    runners = ("greedy_fn", "draft_greedy", "draft_extend", "extend_fn", "prefill_graph")
    graphs = {n: len(getattr(eng, n).graphs) for n in runners}
    compiled = dict(counters["stats"])
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 96, (n,), generator=g).tolist() for n in (7, 40, 19, 3)]
    outs = eng.generate_batch(prompts, [150, 120, 140, 130])
    assert [len(o) for o in outs] == [150, 120, 140, 130]
    assert eng.governor.pauses >= 2 and eng.stats.bursts > 0  # paused, then probed again and paused
    assert {n: len(getattr(eng, n).graphs) for n in runners} == graphs
    assert dict(counters["stats"]) == compiled
