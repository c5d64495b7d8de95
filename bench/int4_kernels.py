"""Measure the int4 kernel table the runtime reads at load (runtime/int4_table.py), on the GPU it serves.

    PYTHONPATH=. python bench/int4_kernels.py --shapes llama3-8b,demo --out int4_h200.json

For each fused linear shape of a model ([N, K]: qkv, o, gate_up, down) and each row bucket, it times the
dense bf16 matmul, torch's tinygemm (where it applies) and our Triton GEMV / GEMM over a grid of tiles
and split counts, on RTN int4 g128 asymmetric codes of a random weight. Every call is replayed from a CUDA
graph, as the runtime's decode step runs it, so launch overhead is not counted, and consecutive calls read
different copies of the weight (256 MB in all), as consecutive layers do, so none is served from L2. Every Triton config is
also checked against the dequantized matmul; a config that fails is recorded and never chosen. Copy the
output to lorafast_export/data/kernels/int4_<gpu>.json (the file name comes from the GPU's name).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lorafast_export.qform import dequantize, pack_nibbles  # noqa: E402
from lorafast_export.quant.rtn import quantize_rtn  # noqa: E402
from lorafast_export.runtime.int4_table import table_file  # noqa: E402
from lorafast_export.runtime.linear import Int4Linear, tinygemm_fits  # noqa: E402
from lorafast_export.runtime.triton_int4 import GEMM, GEMV, launch  # noqa: E402

MODELS = {  # hidden, intermediate, heads, kv heads, head dim
    "llama3-8b": (4096, 14336, 32, 8, 128),
    "demo": (256, 688, 4, 2, 64),
    "tiny": (128, 160, 2, 1, 32),  # --quick dry runs on the CPU (Triton's interpreter)
}
ACT_DTYPE = {"cuda": torch.bfloat16, "cpu": torch.float32}  # the interpreter has no bf16 dot
ROWS = (1, 2, 4, 8, 16, 32, 64, 256)
# Tiles are at most one group wide (BK <= 128 at g128): BN, BK, splits, warps
GEMV_TILES = [(bn, 128, sp, w) for bn, w in ((64, 4), (128, 8), (256, 8)) for sp in (1, 2, 4, 8)]
GEMM_TILES = [(bn, bk, sp, 4) for bn, bk in ((64, 128), (128, 128), (128, 64)) for sp in (1, 2, 4)]
L2_BYTES = 256 << 20  # weight copies cycled per call span this, so no call finds its weight in L2 (50 MB)


def shapes(model: str) -> list[tuple[int, int]]:
    h, i, hq, hkv, d = MODELS[model]
    return [((hq + 2 * hkv) * d, h), (h, hq * d), (2 * i, h), (h, i)]


def graph_us(fn, copies: int, reps: int = 20, replays: int = 7) -> float:
    """GPU microseconds per call of fn(i) (i: which weight copy), replayed from one CUDA graph of `reps`
    calls that cycle through the copies (median of replays). On the CPU (a dry run through Triton's
    interpreter) the wall time of one call."""
    if not torch.cuda.is_available():
        t = time.perf_counter()
        fn(0)
        return (time.perf_counter() - t) * 1e6
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(2):
            fn(i % copies)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(reps):
            fn(i % copies)
    g.replay()
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / reps)
    return sorted(times)[len(times) // 2]


def n_copies(nbytes: int, dev) -> int:
    return 1 if dev.type != "cuda" else max(2, min(20, -(-L2_BYTES // nbytes)))


def best_triton(x, packs, k, ref, entries) -> dict:
    """The fastest correct entry {'us', 'entry', 'rel_err', ...}; packs: copies of (codes, scales, zeros)."""
    best, failed = None, []
    for e in entries:
        try:
            y = launch(x, *packs[0], k, 128, e)
            err = ((y.float() - ref).norm() / ref.norm()).item()
            if not err < 2e-2:
                failed.append({"entry": e, "rel_err": err})
                continue
            us = graph_us(lambda i, e=e: launch(x, *packs[i], k, 128, e), len(packs))
        except Exception as ex:  # noqa: BLE001 - a config that does not compile is a result, not a crash
            failed.append({"entry": e, "error": f"{type(ex).__name__}: {str(ex)[:200]}"})
            continue
        if best is None or us < best["us"]:
            best = {"us": us, "entry": e, "rel_err": err}
    if best is None:
        return {
            "us": None,
            "entry": None,
            "tried": len(entries),
            "failed": failed[:5],
            "n_failed": len(failed),
        }
    best.update(tried=len(entries), failed=failed[:5], n_failed=len(failed))
    return best


def measure_shape(n: int, k: int, dev, quick: bool) -> dict:
    torch.manual_seed(0)
    wf = torch.randn(n, k, device=dev) * 0.02
    qt = quantize_rtn(wf, 4, 128, False, scale_dtype=torch.float16)
    wd = dequantize(qt).to(dev)
    act = ACT_DTYPE[dev.type]
    wbs = [wf.to(act) for _ in range(n_copies(n * k * 2, dev))]
    pack = (pack_nibbles(qt.codes).to(dev), qt.scales.to(dev), qt.zeros.to(dev))
    packs = [pack] + [tuple(t.clone() for t in pack) for _ in range(n_copies(n * k // 2, dev) - 1)]
    tinys = []
    if tinygemm_fits(qt, dev.type == "cuda", torch.bfloat16):
        tinys = [Int4Linear(qt, dtype=act, device=dev) for _ in range(n_copies(n * k // 2, dev))]
    rows = {}
    for m in (1, 8) if quick else ROWS:
        x = torch.randn(m, k, device=dev, dtype=act)
        ref = x.float() @ wd.T
        cell = {"bf16_us": graph_us(lambda i, x=x: F.linear(x, wbs[i]), len(wbs))}
        cell["tinygemm_us"] = graph_us(lambda i, x=x: tinys[i](x), len(tinys)) if tinys else None
        bm = min(64, max(16, 1 << (m - 1).bit_length()))
        gemv, gemm = (GEMV_TILES[:2], GEMM_TILES[-2:]) if quick else (GEMV_TILES, GEMM_TILES)
        if m <= 4:
            cell["gemv"] = best_triton(
                x, packs, k, ref, [[m, GEMV, bn, bk, sp, 16, w] for bn, bk, sp, w in gemv]
            )
        if m > 4 or quick:
            cell["gemm"] = best_triton(
                x, packs, k, ref, [[m, GEMM, bn, bk, sp, bm, w] for bn, bk, sp, w in gemm]
            )
        rows[str(m)] = cell
        brief = {a: (b["us"], b["entry"]) if isinstance(b, dict) else b for a, b in cell.items()}
        print(f"  [{n}x{k}] rows {m}: {json.dumps(brief)}", flush=True)
    return {"n": n, "k": k, "weight_copies_cycled": len(packs), "rows": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--shapes", default="llama3-8b,demo", help=f"models whose linear shapes to measure: {list(MODELS)}"
    )
    p.add_argument("--out", default="")
    p.add_argument("--budget-s", type=float, default=1e9, help="stop adding shapes after this many seconds")
    p.add_argument("--quick", action="store_true", help="two tiles per kernel, rows 1 and 8 (a dry run)")
    a = p.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    import triton

    gpu = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu-interpreter"
    table = {
        "gpu": gpu,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "weights": "RTN int4 g128 asymmetric, fp16 scales, bf16 activations; times: CUDA graph replay",
        "date": time.strftime("%Y-%m-%d"),
        "shapes": [],
    }
    out = Path(a.out or table_file(gpu).name)
    t0 = time.perf_counter()
    for model in a.shapes.split(","):
        for n, k in shapes(model):
            if time.perf_counter() - t0 > a.budget_s:
                print(f"budget: skipped {n}x{k}", flush=True)
                continue
            if any((r["n"], r["k"]) == (n, k) for r in table["shapes"]):
                continue
            table["shapes"].append({"model": model, **measure_shape(n, k, dev, a.quick)})
            out.write_text(json.dumps(table, indent=1))
    print(f"wrote {out} in {time.perf_counter() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
