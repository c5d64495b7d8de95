"""Probe: can a tensor-core bf16 product over a fixed 16-row tile decode at one row as fast as the fused FMA kernels?

A speculative verify runs 3-5 rows through runtime/triton_fused.py's kernels, which give each row its own programs:
1.4-2.6x an op's 1-row time (bench/TORCH.md, session 28), because those kernels are bound by their warps' chains of
FMAs, not by the bytes. A tensor-core product is batch-invariant by construction when its tile is fixed (an MMA's
columns are independent and the k-order is the loop's), so a verify row would be its decode step bit for bit at the
same cost for 1-16 rows. It can replace the decode kernels only if it is as fast at one row. This probe measures that,
before any fused op is built on it.

The kernel: y[m, n] = sum_k x[m, k] w[n, k], weight rows in the MMA's M dimension (BN of them), the activation rows
padded to 16 in its N dimension (tl.dot(w [BN, BK], x^T [BK, 16])), bf16 in, float32 accumulation; SPLIT programs
share a column tile's K (each writes float32 partial sums; a second kernel adds them in a fixed order). Every shape
of Llama-3-8B's layer and its lm_head, at 1, 3, 5 and 8 rows, against the fused FMA op's plain GEMV at its shipped
tile (`gemv_launch`) and cuBLAS (F.linear), all replayed from CUDA graphs over weight copies (not L2-resident);
row i of each multi-row call is checked bit for bit against the 1-row call.

    PYTHONPATH=. python bench/mma_dense_probe.py --out probe.json     # CUDA
    TRITON_INTERPRET=1 PYTHONPATH=. python bench/mma_dense_probe.py --small   # CPU: correctness only
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {  # name: (N, K) of the weight
    "qkv": (6144, 4096),
    "o": (4096, 4096),
    "gate_up": (28672, 4096),
    "down": (4096, 14336),
    "lm_head": (128256, 4096),
}
CONFIGS = [  # (BN, BK, SPLIT, warps, stages)
    (bn, bk, sp, 4, st) for bn in (64, 128) for bk in (128, 256) for sp in (1, 2, 4, 8) for st in (3, 5)
]


@triton.jit
def _mma_gemv(
    x_ptr, w_ptr, p_ptr, M, N, K, KS: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BM: tl.constexpr
):
    """Partial sums p[s, m, n] over split s's K range [s * KS, (s + 1) * KS) (KS a multiple of BK)."""
    pn = tl.program_id(0)
    s = tl.program_id(1)
    rn = pn * BN + tl.arange(0, BN)
    rm = tl.arange(0, BM)
    acc = tl.zeros([BN, BM], tl.float32)
    for kb in range(0, KS, BK):
        rk = s * KS + kb + tl.arange(0, BK)
        w = tl.load(w_ptr + rn[:, None].to(tl.int64) * K + rk[None, :], mask=(rn < N)[:, None], other=0.0)
        xt = tl.load(x_ptr + rm[None, :] * K + rk[:, None], mask=(rm < M)[None, :], other=0.0)
        acc = tl.dot(w, xt, acc)
    tl.store(
        p_ptr + s * M * N + rm[None, :] * N + rn[:, None], acc, mask=(rn < N)[:, None] & (rm < M)[None, :]
    )


@triton.jit
def _split_sum(p_ptr, y_ptr, MN, SPLIT: tl.constexpr, B: tl.constexpr):
    """y = the SPLIT partial sums added in order 0, 1, ..., rounded once."""
    i = tl.program_id(0) * B + tl.arange(0, B)
    acc = tl.load(p_ptr + i, mask=i < MN, other=0.0)
    for s in range(1, SPLIT):
        acc += tl.load(p_ptr + s * MN + i, mask=i < MN, other=0.0)
    tl.store(y_ptr + i, acc.to(y_ptr.dtype.element_ty), mask=i < MN)


def mma_gemv(x: torch.Tensor, w: torch.Tensor, cfg: tuple[int, int, int, int, int], ws: torch.Tensor):
    """x [M <= 16, K] @ w[N, K]^T through the probe kernel; ws: a float32 workspace of >= SPLIT * M * N."""
    bn, bk, split, warps, stages = cfg
    m, k = x.shape
    n = w.shape[0]
    ks = k // split
    p = ws[: split * m * n]
    _mma_gemv[(triton.cdiv(n, bn), split)](
        x, w, p, m, n, k, ks, BN=bn, BK=bk, BM=16, num_warps=warps, num_stages=stages
    )
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    _split_sum[(triton.cdiv(m * n, 1024),)](p, y, m * n, SPLIT=split, B=1024, num_warps=4)
    return y


def fits(cfg, n: int, k: int) -> bool:
    bn, bk, split, _, _ = cfg
    return k % split == 0 and (k // split) % bk == 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="")
    ap.add_argument("--small", action="store_true", help="CPU interpreter: small shapes, correctness only")
    ap.add_argument("--rows", default="1,3,5,8")
    a = ap.parse_args()
    cuda = torch.cuda.is_available() and not a.small
    dev = torch.device("cuda" if cuda else "cpu")
    act = torch.bfloat16 if cuda else torch.float32
    shapes = SHAPES if cuda else {"qkv": (96, 512), "down": (64, 1024)}
    configs = CONFIGS if cuda else [(32, 64, 1, 4, 2), (32, 64, 4, 4, 2), (64, 128, 2, 4, 2)]
    rows = [int(r) for r in a.rows.split(",")]
    from bench.int4_kernels import graph_us, n_copies
    from lorafast_export.runtime import triton_fused as tf

    out: dict = {"gpu": torch.cuda.get_device_name() if cuda else "cpu", "shapes": []}
    t0 = time.perf_counter()
    for name, (n, k) in shapes.items():
        torch.manual_seed(0)
        ws = [torch.randn(n, k, device=dev, dtype=act) * 0.02 for _ in range(n_copies(n * k * 2, dev))]
        x8 = torch.randn(max(rows), k, device=dev, dtype=act)
        work = torch.empty(8 * max(rows) * n, device=dev, dtype=torch.float32)
        ref = x8.float() @ ws[0].float().T
        tiles = tf.fused_config("gemv", n, k)
        row: dict = {"shape": name, "n": n, "k": k, "fused_tiles": "x".join(map(str, tiles)), "rows": {}}
        for m in rows:
            x = x8[:m]
            cell = {
                "cublas_us": graph_us(lambda j, x=x, ws=ws: F.linear(x, ws[j]), len(ws)),
                "fused_fma_us": graph_us(lambda j, x=x, ws=ws, t=tiles: tf.gemv_launch(x, ws[j], t), len(ws)),
                "mma": {},
            }
            for cfg in configs:
                if not fits(cfg, n, k):
                    continue
                key = "x".join(map(str, cfg))
                try:
                    y = mma_gemv(x, ws[0], cfg, work)
                    single = [mma_gemv(x[i : i + 1], ws[0], cfg, work)[0] for i in range(m)]
                    err = ((y.float() - ref[:m]).norm() / ref[:m].norm()).item()
                    same = sum(torch.equal(single[i], y[i]) for i in range(m))
                    us = (
                        graph_us(lambda j, x=x, c=cfg, ws=ws, wk=work: mma_gemv(x, ws[j], c, wk), len(ws))
                        if cuda
                        else 0.0
                    )
                    cell["mma"][key] = {"us": us, "rel_err": err, "rows_equal": same}
                except Exception as ex:  # noqa: BLE001 - a config that fails is a result
                    cell["mma"][key] = {"error": f"{type(ex).__name__}: {ex}"[:160]}
            ok = {c: v["us"] for c, v in cell["mma"].items() if "us" in v and v["rel_err"] < 1e-2}
            if ok:
                best = min(ok, key=ok.get)
                cell["mma_best"], cell["mma_best_us"] = best, ok[best]
                cell["mma_best_rows_equal"] = cell["mma"][best]["rows_equal"]
            row["rows"][m] = cell
            summary = {x_: cell.get(x_) for x_ in ("cublas_us", "fused_fma_us", "mma_best", "mma_best_us")}
            print(f"[{time.perf_counter() - t0:6.1f}s] {name} rows {m}: {json.dumps(summary)}", flush=True)
        out["shapes"].append(row)
        del ws
    if not cuda:
        bad = [
            (r["shape"], m, c, v)
            for r in out["shapes"]
            for m, cell in r["rows"].items()
            for c, v in cell["mma"].items()
            if "error" in v or v["rel_err"] > 1e-5 or v["rows_equal"] != m
        ]
        print("interpreter check:", "every config exact and batch-invariant" if not bad else bad)
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=1))
    if cuda:
        print("\n| shape | rows | cuBLAS us | fused FMA us | MMA best us (config) | MMA rows equal |")
        print("|---|---:|---:|---:|---|---|")
        for r in out["shapes"]:
            for m, c in r["rows"].items():
                print(
                    f"| {r['shape']} | {m} | {c['cublas_us']:.1f} | {c['fused_fma_us']:.1f} | "
                    f"{c.get('mma_best_us', float('nan')):.1f} ({c.get('mma_best')}) | "
                    f"{c.get('mma_best_rows_equal')}/{m} |"
                )


if __name__ == "__main__":
    main()
