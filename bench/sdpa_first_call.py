"""The prefill's attention on a new shape: PyTorch's own SDPA backend choice against flash / efficient only.

    python bench/sdpa_first_call.py            # CUDA

Causal, GQA (32 query heads over 8 kv heads, head dim 128, bf16): the packed prefill's [b, h, L, d] grid at
the mixed workload's shapes (bench/torch_bench.py, section mixed). For each backend set and each new shape: the
first call's wall time (host included, synchronized) and the median of 5 more, and the kernels one call ran
(torch.profiler). Each set gets shapes of its own (L differs by one), so no plan cached by one set serves the
other. Explains why a compiled prefill's first call on a new prompt mix took 3x a repeated one (bench/TORCH.md,
session 15).
"""

from __future__ import annotations

import json
import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

SETS = {
    "torch": None,
    "no-cudnn": [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
}
SHAPES = [(19, 511), (9, 497), (4, 495), (5, 1023), (1, 129)]


def call(q, k, v, backends):
    if backends is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    with sdpa_kernel(backends):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def main() -> None:
    dev, rows = torch.device("cuda"), []
    for i, (name, backends) in enumerate(SETS.items()):
        for b, length in SHAPES:
            length += i  # a shape of this set's own
            q = torch.randn(b, 32, length, 128, device=dev, dtype=torch.bfloat16)
            k, v = (torch.randn(b, 8, length, 128, device=dev, dtype=torch.bfloat16) for _ in range(2))
            torch.cuda.synchronize()
            t = time.perf_counter()
            call(q, k, v, backends)
            torch.cuda.synchronize()
            first = time.perf_counter() - t
            again = []
            for _ in range(5):
                t = time.perf_counter()
                call(q, k, v, backends)
                torch.cuda.synchronize()
                again.append(time.perf_counter() - t)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                call(q, k, v, backends)
                torch.cuda.synchronize()
            kernels = sorted({e.key[:60] for e in prof.key_averages() if e.device_type.name == "CUDA"})
            row = {"set": name, "b": b, "L": length, "first_ms": 1e3 * first,
                   "again_ms": 1e3 * statistics.median(again), "kernels": kernels}  # fmt: skip
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("| backends | b x L | first call ms | again ms |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['set']} | {r['b']} x {r['L']} | {r['first_ms']:.2f} | {r['again_ms']:.2f} |")


if __name__ == "__main__":
    main()
