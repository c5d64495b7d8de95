"""Probe: the dense fused decode ops (runtime/triton_fused.py) at 2-8 rows with the rows in one program.

A speculative verify (k + 1 rows) of the bf16 model runs the CUDA-core fused ops at every row, so that each verify
row is its one-row decode step bit for bit. With a program a row (`_fused_kernel`) a 5-row verify of the 8B shape
cost ~12 ms against ~5.4 ms for a one-row step (bench/TORCH.md, session 41): every program reads its weight tile
and runs its own FMA chains. `_fused_rows_kernel` reads a tile once a program and multiplies RB rows with it.

For every op at the Llama-3-8B shapes (and its lm_head), at 1, 2, 3, 4, 5 and 8 rows: the program-a-row kernel,
the rows kernel at rows_config's (RB, BN) and at the other candidates, and the tensor-core kernels (mma_config),
each replayed from CUDA graphs over weight copies (not L2-resident), microseconds a call; and for each rows-kernel
result, whether every row equals the one-row call of the program-a-row kernel bit for bit (`bits`), which is
what a verify needs (the one-row decode step runs `_fused_kernel`), and whether every row equals the rows kernel's
own one-row call (RB = 1) at that BN (`bits_own`: what a runtime taking the rows kernel at every row would need;
the 1-row lines time those).

    PYTHONPATH=. python bench/fused_rows_probe.py --out probe.json            # CUDA
    TRITON_INTERPRET=1 PYTHONPATH=. python bench/fused_rows_probe.py --small  # CPU: the checks only (float32)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lorafast_export.runtime import triton_fused as tf  # noqa: E402
from lorafast_export.runtime.kernel_tune import graph_us, n_copies  # noqa: E402

OPS = {  # name: (op, N, K) of the weight at the 8B shape
    "qkv_rope": ("add_norm_qkv_rope", 6144, 4096),
    "o": ("gemv_add", 4096, 4096),
    "gate_up": ("norm_glu", 28672, 4096),
    "down": ("gemv", 4096, 14336),
    "lm_head": ("add_norm_gemv", 128256, 4096),
}
SMALL = {k: (op, n // 64 if k != "down" else 64, 256) for k, (op, n, _) in OPS.items()}
ROWS = (1, 2, 3, 4, 5, 8)


def _call(op, x, w, tiles, inp, rows=None, at=slice(0, 8)):
    """The op on rows `at` of the inputs with weight w; rope: q, then the k and v it wrote at the rows' slots."""
    r, d, nw, rope = inp
    x, d, r = x[at], d[at], r[at]
    if op == "add_norm_gemv":
        return tf.add_norm_gemv_launch(x, d, nw, w, 1e-5, tiles, rows=rows)[1]
    if op == "add_norm_qkv_rope":
        cos, sin, kp, vp, slots, qn = rope
        s = slots[at]
        q = tf.add_norm_qkv_rope_launch(
            x, d, nw, w, 1e-5, None, cos[at], sin[at], kp, vp, s, qn, tiles, rows=rows
        )[1]
        return torch.cat([q, kp[:, s].transpose(0, 1).flatten(1), vp[:, s].transpose(0, 1).flatten(1)], 1)
    if op == "gemv_add":
        return tf.gemv_add_launch(x, w, r, tiles, rows=rows)
    if op == "norm_glu":
        return tf.norm_glu_launch(x, nw, w, 1e-5, tiles, rows=rows)
    return tf.gemv_launch(x, w, tiles, rows=rows)


def _inputs(op, n, k, dev, act, hd=128):
    g = torch.Generator().manual_seed(n + k)
    x, d = (torch.randn(8, k, generator=g).to(dev, act) for _ in range(2))
    cols = n // 2 if op == "norm_glu" else n
    r = torch.randn(8, cols, generator=g).to(dev, act)
    nw = (1 + 0.1 * torch.randn(k, generator=g)).to(dev, act)
    rope = None
    if op == "add_norm_qkv_rope":
        hd = min(hd, n // 6)
        hkv = n // hd // 6  # [q; k; v] with 4 q heads a kv head
        pos = torch.arange(8, device=dev).float() * 97 + 5
        emb = pos[:, None] * (1.0 / 500000 ** (torch.arange(0, hd, 2, device=dev).float() / hd))
        emb = torch.cat([emb, emb], -1)
        kp, vp = (torch.zeros(hkv, 1024, hd, device=dev, dtype=act) for _ in range(2))
        rope = (
            emb.cos().to(act),
            emb.sin().to(act),
            kp,
            vp,
            torch.arange(8, device=dev) * 101 + 3,
            4 * hkv * hd,
        )
    return x, (r, d, nw, rope)


def _candidates(op, n, k, tiles, m):
    """(RB, BN) pairs to time at m rows: rows_config's first, then every other power-of-two split."""
    bn0, bk, warps, _ = tiles
    first = tf.rows_config(op, n, k, tiles, m)
    out = [first]
    rb = 2
    while rb <= triton_next_pow2(m):
        bn = bn0
        while bn >= 1:
            if (rb, bn) not in out and rb * bn * bk <= 2 * tf.ROWS_ACC * 32 * warps:
                out.append((rb, bn))
            bn //= 2
        rb *= 2
    return out


def _bns(tiles):
    """The one-row tile's BN and every smaller power of two."""
    return [tiles[0] >> i for i in range(tiles[0].bit_length())]


def triton_next_pow2(m: int) -> int:
    return 1 << (m - 1).bit_length()


def _probe(name, shape, rows, dev, act) -> list[dict]:
    """One op's rows: the program-a-row kernel, the tensor cores and the rows kernel's candidates, timed."""
    op, n, k = shape
    tiles = tf.fused_config(op, n, k)
    torch.manual_seed(0)
    ws = [torch.randn(n, k, device=dev, dtype=act) * 0.02 for _ in range(n_copies(n * k * 2, dev))]
    x, inp = _inputs(op, n, k, dev, act)

    def run(i, at, t=tiles, rows=None):
        return _call(op, x, ws[i], t, inp, rows=rows, at=at)

    tf.ROWS_IN_PROGRAM = False
    one = [run(0, slice(i, i + 1))[0] for i in range(8)]  # the one-row decode steps
    # the rows kernel's own one-row results (RB = 1, each BN): what a runtime taking it at every row would decode
    own = {bn: [run(0, slice(i, i + 1), rows=(1, bn))[0] for i in range(8)] for bn in _bns(tiles)}
    out = []
    for m in rows:
        row: dict = {"op": name, "n": n, "k": k, "rows": m, "tiles": list(tiles)}
        at = slice(0, m)
        tf.ROWS_IN_PROGRAM = False
        row["row_programs_us"] = graph_us(lambda i, at=at: run(i, at), len(ws))
        row["mma_us"] = graph_us(lambda i, at=at: run(i, at, tf.mma_config(op, n, k)), len(ws))
        tf.ROWS_IN_PROGRAM = True
        row["cands"] = []
        for rb, bn in _candidates(op, n, k, tiles, m) if m > 1 else [(1, b) for b in _bns(tiles)]:
            cell: dict = {"rb": rb, "bn": bn}
            try:
                y = run(0, at, rows=(rb, bn))
                cell["bits"] = all(torch.equal(y[i], one[i]) for i in range(m))
                cell["bits_own"] = all(torch.equal(y[i], own[bn][i]) for i in range(m))
                cell["us"] = graph_us(lambda i, at=at, c=(rb, bn): run(i, at, rows=c), len(ws))
            except Exception as ex:  # noqa: BLE001 - a configuration that fails is a result
                cell["error"] = f"{type(ex).__name__}: {ex}"[:300]
            row["cands"].append(cell)
        out.append(row)
        print(json.dumps(row), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="small shapes (the CPU interpreter)")
    ap.add_argument("--ops", default=",".join(OPS))
    ap.add_argument("--rows", default=",".join(map(str, ROWS)))
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    act = torch.bfloat16 if dev.type == "cuda" else torch.float32
    shapes = SMALL if a.small else OPS
    res: dict = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "ops": []}
    t0 = time.perf_counter()
    rows = [int(m) for m in a.rows.split(",")]
    for name in a.ops.split(","):
        res["ops"] += _probe(name, shapes[name], rows, dev, act)
    res["wall_s"] = time.perf_counter() - t0
    print(f"\n{'op':9} {'rows':>4} {'prog/row us':>11} {'mma us':>8} {'rows-kernel us (RB,BN) bits':>30}")
    for r in res["ops"]:
        best = min((c for c in r["cands"] if "us" in c), key=lambda c: c["us"], default=None)
        dflt = r["cands"][0] if r["cands"] else None
        txt = ""
        if dflt:
            txt = f"default {dflt.get('us', float('nan')):.1f} ({dflt['rb']},{dflt['bn']}) {dflt.get('bits')}"
            if best:
                txt += f" | best {best['us']:.1f} ({best['rb']},{best['bn']}) {best['bits']}"
        print(f"{r['op']:9} {r['rows']:>4} {r['row_programs_us']:>11.1f} {r['mma_us']:>8.1f} {txt}")
    if a.out:
        a.out.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
