"""The fused decode ops on the CUDA MMA kernel (runtime/cuda_int4.py: add_norm_qkv_rope, gemv_add, norm_glu) at
the 8B shapes, over their block layouts, beside the plain MMA product of the same weight at the layout the
shipped int4 table chooses (what the unfused step runs; its RMSNorm, rope, k/v write, silu-mul and residual add
are further kernels, bench/TORCH.md's profiles). CUDA-graph replay over weight copies, as bench/int4_kernels.py.

    PYTHONPATH=. python bench/mma_fused_bench.py --rows 1,8 --out fused.json \
        --merge-into lorafast_export/data/kernels/int4_h200.json

--merge-into writes each op's fastest 1-row layout into the int4 table's "fused_mma" section, which the runtime
reads at load (runtime/int4_table.py `fused_mma_layout`; an unmeasured shape is not fused).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.int4_kernels import MODELS, graph_us, n_copies  # noqa: E402
from lorafast_export.runtime import cuda_int4  # noqa: E402
from lorafast_export.runtime.int4_table import load_table  # noqa: E402

LAYOUTS = [
    (ksb, minb, bits)
    for ksb in (4, 8, 16)
    for minb in (0, 2, 3, 4)
    for bits in (0, cuda_int4.SUBA, cuda_int4.SUBX)
]


def weight(n: int, k: int, dev) -> types.SimpleNamespace:
    codes = torch.randint(0, 16, (n, k), device=dev, dtype=torch.uint8)
    return types.SimpleNamespace(
        weight_frags=cuda_int4.pack_frags(codes, 128),
        scales=(torch.rand(n, k // 128, device=dev) * 0.01).half(),
        zeros=torch.randint(0, 16, (n, k // 128), device=dev, dtype=torch.uint8),
        in_features=k,
        out_features=n,
        group_size=128,
    )


def measure(op: str, ws: list, m: int, entry, dims: tuple) -> dict:
    """One op at m rows: the plain product at the table's entry and the fused op at every layout that fits."""
    dev, dt = ws[0].scales.device, torch.bfloat16
    hq, hkv, hd = dims
    n, k = ws[0].out_features, ws[0].in_features
    x = torch.randn(m, k, device=dev, dtype=dt)
    d, nw = torch.randn_like(x), torch.rand(k, device=dev, dtype=dt) + 0.5
    res = torch.randn(m, n, device=dev, dtype=dt)
    kp = torch.zeros(hkv, 4096, hd, device=dev, dtype=dt)
    vp, slots = torch.zeros_like(kp), torch.arange(m, device=dev) * 7
    cos, sin = torch.rand(m, hd, device=dev, dtype=dt), torch.rand(m, hd, device=dev, dtype=dt)
    plain = None
    if entry:
        ksb, rpw, minb, bits = cuda_int4.layout(entry)

        def product(i):
            w = ws[i]
            return cuda_int4.mma_mm(x, w.weight_frags, w.scales, w.zeros, k, 128, ksb, rpw, minb, bits)

        plain = round(graph_us(product, len(ws)), 2)

    def call(i, lay):
        w = ws[i]
        args = (w.weight_frags, w.scales, w.zeros, k, 128, lay)
        if op == cuda_int4.QKV_OP:
            rope = (cos, sin, kp, vp, slots, hq * hd)
            return cuda_int4.fused_launch(op, x, *args, delta=d, nw=nw, eps=1e-5, rope=rope)
        if op == cuda_int4.O_OP:
            return cuda_int4.fused_launch(op, x, *args, res=res)
        return cuda_int4.fused_launch(op, x, *args, nw=nw, eps=1e-5)

    timed = []
    for lay in LAYOUTS:
        if m > 1 and lay[2] & cuda_int4.SUBX:  # SUBX: one row only
            continue
        why = cuda_int4.fused_unready(op, ws[0], lay, dt, False, hd if op == cuda_int4.QKV_OP else 0)
        if why is None:
            timed.append([list(lay), round(graph_us(lambda i, lay=lay: call(i, lay), len(ws)), 2)])
    timed.sort(key=lambda t: t[1])
    return {"op": op, "n": n, "k": k, "rows": m, "plain_entry": entry, "plain_us": plain, "fused": timed}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="1,8")
    p.add_argument("--out", default="")
    p.add_argument("--merge-into", default="", help="the int4 table to write the 1-row layouts into")
    a = p.parse_args()
    dev = torch.device("cuda")
    h, inter, hq, hkv, hd = MODELS["llama3-8b"]
    table = load_table(torch.cuda.get_device_name()) or {}
    ops = {
        cuda_int4.QKV_OP: ((hq + 2 * hkv) * hd, h),
        cuda_int4.O_OP: (h, hq * hd),
        cuda_int4.GLU_OP: (2 * inter, h),
    }
    out = {"gpu": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"), "results": []}
    for op, (n, k) in ops.items():
        ws = [weight(n, k, dev) for _ in range(n_copies(n * k // 2, dev))]
        row = next((r for r in table.get("shapes", []) if (r["n"], r["k"]) == (n, k)), None)
        for m in (int(r) for r in a.rows.split(",")):
            entry = (((row or {}).get("rows", {}).get(str(m)) or {}).get("mma") or {}).get("entry")
            r = measure(op, ws, m, entry, (hq, hkv, hd))
            print(json.dumps({**r, "fused": r["fused"][:5]}), flush=True)
            out["results"].append(r)
            if a.out:
                Path(a.out).write_text(json.dumps(out, indent=1))
    if a.merge_into:
        merge(Path(a.merge_into), out)


def merge(path: Path, out: dict) -> None:
    """The table at path with each measured op's fastest 1-row layout in its "fused_mma" section (whole or not at
    all: the runtime may read it)."""
    table = json.loads(path.read_text())
    for r in out["results"]:
        if r["rows"] == 1 and r["fused"]:
            cell = {"layout": r["fused"][0][0], "us": r["fused"][0][1], "plain_us": r["plain_us"], "rows": 1}
            table.setdefault("fused_mma", {}).setdefault(r["op"], {})[f"{r['n']}x{r['k']}"] = cell
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(table, indent=1))
    tmp.replace(path)


if __name__ == "__main__":
    main()
