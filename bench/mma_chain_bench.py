"""An 8B decode step's int4 products at one row, as the runtime runs them (the fused qkv, o and glu ops, the plain
down product; runtime/cuda_int4.py, the shipped table's layouts), chained over all 32 layers in one CUDA graph:
with and without programmatic dependent launch (PDL: a kernel starts loading its weights while the previous one
ends). Also each op's floor (`--floors`): a plain read of its bytes, cold and L2-hot, beside the op.

The isolated-op tables (bench/mma_fused_bench.py, bench/int4_kernels.py) time one op over weight copies; what
a decode step pays is the chain, where each small product starts with a DRAM round trip and ends in a partial
wave. Every configuration's outputs are compared with the plain chain's, bit for bit.

    PYTHONPATH=. python bench/mma_chain_bench.py --out chain.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.int4_kernels import MODELS, capture, replay_us  # noqa: E402
from bench.mma_fused_bench import weight  # noqa: E402
from lorafast_export.runtime import cuda_int4 as ci  # noqa: E402
from lorafast_export.runtime.int4_table import fused_mma_layout, load_table  # noqa: E402

MB = 1 << 20


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def build(n_layers: int, dev) -> tuple[list, dict]:
    h, inter, hq, hkv, hd = MODELS["llama3-8b"]
    shapes = {"qkv": ((hq + 2 * hkv) * hd, h), "o": (h, hq * hd), "glu": (2 * inter, h), "down": (h, inter)}
    layers = [{name: weight(n, k, dev) for name, (n, k) in shapes.items()} for _ in range(n_layers)]
    return layers, {"shapes": shapes, "dims": (hq, hkv, hd)}


def chain(layers, meta, lays, down_entry, extra: dict, attention: bool, dev):
    """fn() running the chain; extra[op] = bits added to op's layout (PDL); attention: a torch kernel between
    qkv and o (the step's attention, which is not ours: no programmatic launch across it)."""
    hq, hkv, hd = meta["dims"]
    h, inter = meta["shapes"]["o"][0], meta["shapes"]["down"][1]
    dt = torch.bfloat16
    torch.manual_seed(0)  # the same inputs for every configuration: their outputs are compared
    x = torch.randn(1, h, device=dev, dtype=dt)
    d, nw = torch.randn_like(x), torch.rand(h, device=dev, dtype=dt) + 0.5
    a = torch.randn(1, hq * hd, device=dev, dtype=dt)
    act = torch.randn(1, inter, device=dev, dtype=dt)
    kp = torch.zeros(hkv, 4096, hd, device=dev, dtype=dt)
    vp, slots = torch.zeros_like(kp), torch.tensor([5], device=dev)
    cos, sin = torch.rand(1, hd, device=dev, dtype=dt), torch.rand(1, hd, device=dev, dtype=dt)
    order = [(i, op) for i in range(len(layers)) for op in ("qkv", "o", "glu", "down")]

    def run():
        outs = []
        for i, op in order:
            w, e = layers[i][op], extra.get(op, 0)
            args = (w.weight_frags, w.scales, w.zeros, w.in_features, 128)
            if op == "qkv":
                lay = (lays[0][0], lays[0][1], lays[0][2] | e)
                rope = (cos, sin, kp, vp, slots, hq * hd)
                outs.append(ci.fused_launch(ci.QKV_OP, x, *args, lay, delta=d, nw=nw, eps=1e-5, rope=rope)[1])
                if attention:
                    outs.append(outs[-1] * 0.5)  # a kernel of torch's between qkv and o, as attention is
            elif op == "o":
                lay = (lays[1][0], lays[1][1], lays[1][2] | e)
                outs.append(ci.fused_launch(ci.O_OP, a, *args, lay, res=x))
            elif op == "glu":
                lay = (lays[2][0], lays[2][1], lays[2][2] | e)
                outs.append(ci.fused_launch(ci.GLU_OP, x, *args, lay, nw=nw, eps=1e-5))
            else:
                ksb, rpw, minb, bits = ci.layout(down_entry)
                outs.append(ci.mma_mm(act, *args, ksb, rpw, minb, bits | e))
        return outs

    return run


def graph_chain_us(run, replays: int = 9) -> tuple[float, list]:
    """The median microseconds of one replay of the chain's graph, and copies of its outputs."""
    g, outs = capture(run)
    return replay_us(g, replays), [o.clone() for o in outs]


READ_SRC = r"""
extern "C" __global__ void read_all(const uint4* __restrict__ p, int n16, unsigned* out) {
    unsigned acc = 0;
    const int stride = gridDim.x * blockDim.x;
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    for (; i + 3 * stride < n16; i += 4 * stride) {  // four 16-byte loads in flight a thread
        uint4 v[4];
#pragma unroll
        for (int u = 0; u < 4; ++u)
            asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                         : "=r"(v[u].x), "=r"(v[u].y), "=r"(v[u].z), "=r"(v[u].w) : "l"(p + i + u * stride));
#pragma unroll
        for (int u = 0; u < 4; ++u) acc ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
    }
    for (; i < n16; i += stride) acc ^= p[i].x ^ p[i].y ^ p[i].z ^ p[i].w;
    if (acc == 0x9E3779B9u) out[0] = acc;  // keeps the loads
}
"""


def floors(layers, meta, lays, down_entry, dev) -> list[dict]:
    """Per op: a plain streaming read of the same bytes (the floor a kernel of this size can reach here), cold
    (a different copy each call, as in a decode step) and hot (the same bytes each call: L2-resident where they
    fit in its 50 MB); and the op itself cold and hot. Hot much faster than cold: the op waits on DRAM; hot near
    cold: on its own instructions."""
    from bench.int4_kernels import graph_us

    read = torch.cuda._compile_kernel(READ_SRC, "read_all")
    sink = torch.zeros(1, device=dev, dtype=torch.int32)
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    h, inter = meta["shapes"]["o"][0], meta["shapes"]["down"][1]
    hq, hkv, hd = meta["dims"]
    dt = torch.bfloat16
    torch.manual_seed(0)
    x, xa, xd = (torch.randn(1, k, device=dev, dtype=dt) for k in (h, hq * hd, inter))
    nw = torch.rand(h, device=dev, dtype=dt) + 0.5
    kp = torch.zeros(hkv, 4096, hd, device=dev, dtype=dt)
    vp, slots = torch.zeros_like(kp), torch.tensor([5], device=dev)
    cos, sin = torch.rand(1, hd, device=dev, dtype=dt), torch.rand(1, hd, device=dev, dtype=dt)
    ksb, rpw, minb, bits = ci.layout(down_entry)

    def lay(i, e):
        return (lays[i][0], lays[i][1], lays[i][2] | e)

    calls = {
        "qkv": lambda w, e: ci.fused_launch(ci.QKV_OP, x, w.weight_frags, w.scales, w.zeros, h, 128, lay(0, e),
                                            delta=x, nw=nw, eps=1e-5, rope=(cos, sin, kp, vp, slots, hq * hd)),
        "o": lambda w, e: ci.fused_launch(ci.O_OP, xa, w.weight_frags, w.scales, w.zeros, hq * hd, 128, lay(1, e),
                                          res=x),
        "glu": lambda w, e: ci.fused_launch(ci.GLU_OP, x, w.weight_frags, w.scales, w.zeros, h, 128, lay(2, e),
                                            nw=nw, eps=1e-5),
        "down": lambda w, e: ci.mma_mm(xd, w.weight_frags, w.scales, w.zeros, inter, 128, ksb, rpw, minb, bits | e),
    }  # fmt: skip
    out = []
    for op, call in calls.items():
        ws = [layer[op] for layer in layers]
        nb = nbytes(ws[0].weight_frags) + nbytes(ws[0].scales) + nbytes(ws[0].zeros)

        def rd(i, ws=ws):
            w = ws[i].weight_frags
            n16 = nbytes(w) // 16
            read(grid=(sms * 8, 1, 1), block=(256, 1, 1), args=[w, n16, sink])

        r = {"op": op, "mb": round(nb / MB, 2)}
        r["read_cold_us"] = round(graph_us(rd, len(ws)), 2)
        r["read_hot_us"] = round(graph_us(rd, 1), 2)
        for e, tag in ((0, ""), (ci.PDL, "_pdl")):
            r[f"op{tag}_cold_us"] = round(
                graph_us(lambda i, ws=ws, call=call, e=e: call(ws[i], e), len(ws)), 2
            )
            r[f"op{tag}_hot_us"] = round(graph_us(lambda i, ws=ws, call=call, e=e: call(ws[0], e), 1), 2)
        r["read_cold_tb_s"] = round(nb / (r["read_cold_us"] * 1e-6) / 1e12, 3)
        r["op_cold_tb_s"] = round(nb / (r["op_cold_us"] * 1e-6) / 1e12, 3)
        print(json.dumps(r), flush=True)
        out.append(r)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--out", default="")
    p.add_argument("--floors", action="store_true", help="only the per-op floors (`floors`)")
    p.add_argument("--configs", default="", help="only these configurations (comma-separated names)")
    a = p.parse_args()
    dev = torch.device("cuda")
    gpu = torch.cuda.get_device_name()
    layers, meta = build(a.layers, dev)
    sh = meta["shapes"]
    lays = [
        fused_mma_layout(gpu, op, *sh[k])
        for op, k in ((ci.QKV_OP, "qkv"), (ci.O_OP, "o"), (ci.GLU_OP, "glu"))
    ]
    table = load_table(gpu) or {}
    row = next(r for r in table["shapes"] if (r["n"], r["k"]) == sh["down"])
    down_entry = row["rows"]["1"]["mma"]["entry"]
    weight_mb = (
        sum(nbytes(w.weight_frags) + nbytes(w.scales) + nbytes(w.zeros) for w in layers[0].values()) / MB
    )
    every = ("qkv", "o", "glu", "down")
    configs = [
        ("plain", {}, False),
        ("PDL", {o: ci.PDL for o in every}, False),
        ("plain, attention stand-in", {}, True),
        ("PDL, attention stand-in", {o: ci.PDL for o in every}, True),
        ("PDL + SUBX", {o: ci.PDL | ci.SUBX for o in every}, False),
    ]
    if a.configs:
        configs = [c for c in configs if c[0] in a.configs.split(",")]
    res = {"gpu": gpu, "date": time.strftime("%Y-%m-%d"), "layers": a.layers, "layouts": lays,
           "down_entry": down_entry, "layer_weight_mb": round(weight_mb, 2), "results": []}  # fmt: skip
    if a.floors:
        res["floors"] = floors(layers, meta, lays, down_entry, dev)
        if a.out:
            Path(a.out).write_text(json.dumps(res, indent=1))
        return
    ref = {}
    for rep in range(3):  # interleaved
        for name, extra, attention in configs:
            us, outs = graph_chain_us(chain(layers, meta, lays, down_entry, extra, attention, dev))
            base = ref.setdefault(attention, outs)
            same = base is outs or all(torch.equal(o, r) for o, r in zip(outs, base, strict=True))
            rel = max(
                ((o.float() - r.float()).abs().max() / r.float().abs().max()).item()
                for o, r in zip(outs, base, strict=True)
            )
            per_layer = us / a.layers
            r = {"config": name, "rep": rep, "chain_us": round(us, 1), "layer_us": round(per_layer, 2),
                 "tb_s": round(weight_mb * MB / (per_layer * 1e-6) / 1e12, 3), "outputs_equal": same,
                 "max_rel_diff": rel}  # fmt: skip
            print(json.dumps(r), flush=True)
            res["results"].append(r)
            if a.out:
                Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
