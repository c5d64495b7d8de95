"""Session 33, call 5: what the default prefill_chunk (2048) costs a runtime's load-time warm-up (the chunk layer's
graphs), and whether a chunked prompt after it compiles anything. 8B bf16 random weights, max_seq_len 4096 (the
default), one prefill_chunk per process, each with its own inductor cache (both cold):

    TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) python bench/results/s33_warm.py 2048
"""

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench.torch_bench import config_of, hf_model  # noqa: E402
from lorafast_export.runtime.bench import random_prompts  # noqa: E402
from lorafast_export.runtime.loader import build_runtime  # noqa: E402
from lorafast_export.runtime.options import RuntimeOptions  # noqa: E402

chunk, shape = int(sys.argv[1]), (sys.argv[2:] or ["llama3-8b"])[0]  # another shape: a dry run on the CPU
dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
model = hf_model(shape, dev, dtype)
cfg, state = config_of(model)
del model
t = time.perf_counter()
rt = build_runtime(
    cfg, state, None, dev, torch.bfloat16, RuntimeOptions(max_seq_len=4096, prefill_chunk=chunk)
)
load_s, eng = time.perf_counter() - t, rt.engine
res = {
    "prefill_chunk": chunk,
    "load_s": round(load_s, 1),
    "warm_up_s": eng.warm_up_s and round(eng.warm_up_s, 1),
}
for i, n in enumerate((3000, 3000)):  # first pass (what warm-up left), then again
    reqs = [eng.add(p, 64) for p in random_prompts(4, 16, cfg.vocab_size, 5 + i)]
    eng.step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    lr, t0 = eng.add(random_prompts(1, n, cfg.vocab_size, 9 + i)[0], 8), time.perf_counter()
    while lr.t_first is None:
        eng.step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    res[f"ttft_ms_pass{i + 1}"] = round(1e3 * (time.perf_counter() - t0), 1)  # until the step returned
    res[f"first_token_ms_pass{i + 1}"] = round(1e3 * (lr.t_first - t0), 1)  # when the engine had it
    while eng.has_work:
        eng.step()
res["prefill_chunks"] = eng.stats.prefill_chunks
print(json.dumps(res), flush=True)
