"""Where GPTQ's scale refit (quant/gptq.refit_scales) spends its GPU time on Llama-3-8B layer shapes: each call
timed, the batched solve alone on one row chunk (solve_ex float64 against Cholesky float64 / float32), and a
torch.profiler kernel table. Random weights, H from 2,048 random inputs, RTN codes (the refit's cost does not
depend on where the codes came from). Device only:

    PYTHONPATH=. python bench/refit_profile.py

Results: bench/QUANT.md, session 11."""

import time

import torch

from lorafast_export.quant import gptq
from lorafast_export.quant.rtn import quantize_rtn

SHAPES = [("qkv", 6144, 4096), ("o", 4096, 4096), ("gate_up", 28672, 4096), ("down", 4096, 14336)]


def seconds(fn, repeats: int = 3) -> float:
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats


def profile_shape(name: str, out: int, n: int, dev: str = "cuda") -> None:
    w = torch.randn(out, n, device=dev)
    x = torch.randn(2048, n, device=dev)
    h = x.T @ x / 2048
    qt = quantize_rtn(w, 4, 128, False, torch.float16, None)
    total = seconds(lambda: gptq.refit_scales(w, h, qt.codes, qt.scales, qt.zeros, 4, 128))
    g = n // 128
    rows = min(out, max(1, gptq.REFIT_CHUNK_ELEMENTS["cuda"] // (g * g * 128)))
    a = torch.randn(rows, g, g, device=dev, dtype=torch.float64)
    a = a @ a.transpose(1, 2) + g * torch.eye(g, device=dev, dtype=torch.float64)
    b = torch.randn(rows, g, device=dev, dtype=torch.float64)
    lu = seconds(lambda: torch.linalg.solve_ex(a, b))
    ch = seconds(lambda: torch.cholesky_solve(b[..., None], torch.linalg.cholesky_ex(a)[0]))
    a32, b32 = a.float(), b.float()
    ch32 = seconds(lambda: torch.cholesky_solve(b32[..., None], torch.linalg.cholesky_ex(a32)[0]))
    print(
        f"{name}: refit {total * 1e3:.1f} ms a call; chunks of {rows} rows x {-(-out // rows)}: solve_ex f64 "
        f"{lu * 1e3:.1f} ms, cholesky f64 {ch * 1e3:.1f}, cholesky f32 {ch32 * 1e3:.1f} (one chunk)",
        flush=True,
    )
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        gptq.refit_scales(w, h, qt.codes, qt.scales, qt.zeros, 4, 128)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=8), flush=True)


if __name__ == "__main__":
    torch.manual_seed(0)
    for shape in SHAPES:
        profile_shape(*shape)
