"""Session 34, call 4: tiles for runtime/triton_w8a8.py and the row count from which W8A8Linear runs it, then
bf16 against a SmoothQuant 8B model end to end with the measured choice, in one process (CUDA).

Per 8B linear and row count (CUDA-graph replay over 3 weight copies, us per call): bf16 F.linear; W8A8Linear
compiled with cuBLAS's int8 GEMM only; our Triton GEMM alone (int8 codes and scales ready) for each config;
W8A8Linear compiled with the Triton GEMM at every row count (the rule's tiles). The best config per row
bucket (least summed time over the four linears) replaces `triton_w8a8.tiles`, TRITON_FROM becomes the
least measured row count from which the compiled Triton path beat cuBLAS's on every linear, and
bench/torch_bench.py then runs --sections copy,bf16,w8a8 (its own arguments after `--`).
    python bench/results/s34_w8a8_tiles.py OUT.json -- --device cuda --shape llama3-8b ..."""

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from lorafast_export.qform import ACT_QUANT_INT8_PER_TOKEN, with_fields  # noqa: E402
from lorafast_export.quant.rtn import quantize_rtn  # noqa: E402
from lorafast_export.runtime import linear, triton_w8a8  # noqa: E402
from lorafast_export.runtime.kernel_tune import graph_us  # noqa: E402

torch._dynamo.config.recompile_limit = 1024
dev = torch.device("cuda")
SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
ROWS = [32, 64, 128, 256, 1024, 4096]
CONFIGS = [
    (32, 128, 128, 8, 4, 4),
    (64, 128, 128, 8, 4, 4),
    (64, 256, 128, 8, 8, 3),
    (64, 128, 256, 8, 4, 3),
    (128, 128, 128, 8, 4, 4),
    (128, 128, 128, 8, 8, 4),
    (128, 256, 128, 8, 8, 3),
    (128, 128, 256, 8, 8, 3),
    (256, 128, 128, 8, 8, 3),
]


def bucket(m: int) -> int:
    return 0 if m <= 64 else 1 if m <= 256 else 2


def modules(qt, triton: bool, copies: int) -> list:
    out = []
    for _ in range(copies):
        mod = linear.W8A8Linear(with_fields(qt, codes=qt.codes.clone()), None, torch.bfloat16, dev)
        mod.triton = triton
        mod.TRITON_FROM = 1
        out.append(torch.compile(mod))
    return out


rows_out, copies = [], 3
for name, (n, k) in SHAPES.items():
    torch.manual_seed(0)
    w = torch.randn(n, k, device=dev) * 0.02
    qt = with_fields(quantize_rtn(w, 8, -1, True), act_quant=ACT_QUANT_INT8_PER_TOKEN)
    wb = [w.bfloat16().clone() for _ in range(copies)]
    wq = [(qt.codes.to(torch.int16) - 128).to(torch.int8).contiguous() for _ in range(copies)]
    sw = qt.scales[:, 0].float().contiguous()
    del w
    mods = {"cublas": modules(qt, False, copies), "triton_rule": modules(qt, True, copies)}
    for m in ROWS:
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        codes, sx = linear.int8_per_token(x)
        xq = codes.to(torch.int8)
        row = {"linear": name, "n": n, "k": k, "rows": m}
        row["bf16"] = graph_us(lambda j, x=x, wb=wb: F.linear(x, wb[j]), copies)
        with torch.no_grad():
            for kind, ms in mods.items():
                ms[0](x)
                row[kind] = graph_us(lambda j, x=x, ms=ms: ms[j](x), copies)
        cfgs = {}
        for c in CONFIGS:
            try:
                ref = triton_w8a8.launch(xq, wq[0], sx, sw, torch.float32, c)
                want = (xq.float() @ wq[0].float().T) * sx * sw
                if not ((ref - want).abs().max() <= 1e-3 * want.abs().max()):
                    cfgs[str(c)] = "wrong"
                    continue
                cfgs[str(c)] = graph_us(
                    lambda j, c=c, xq=xq, sx=sx, wq=wq, sw=sw: triton_w8a8.launch(
                        xq, wq[j], sx, sw, torch.bfloat16, c
                    ),
                    copies,
                )
            except Exception as e:  # noqa: BLE001 - a config that does not fit is a result
                cfgs[str(c)] = f"{type(e).__name__}: {str(e)[:120]}"
        row["triton_configs"] = cfgs
        rows_out.append(row)
        print(json.dumps(row), flush=True)
    del mods, wb, wq

best = {}
for b in range(3):
    totals = {}
    for c in CONFIGS:
        ts = [r["triton_configs"].get(str(c)) for r in rows_out if bucket(r["rows"]) == b]
        if ts and all(isinstance(t, float) for t in ts):
            totals[c] = sum(ts)
    best[b] = min(totals, key=totals.get)
    print(
        f"bucket {b}: best {best[b]} summed {totals[best[b]]:.1f} us; all {json.dumps({str(c): round(t, 1) for c, t in totals.items()})}"
    )
wins = [
    m
    for m in ROWS
    if all(
        min(v for v in r["triton_configs"].values() if isinstance(v, float)) < r["cublas"]
        for r in rows_out
        if r["rows"] == m
    )
]
frm = next((m for m in ROWS if all(x in wins for x in ROWS if x >= m)), None)
print(f"best Triton config beats cuBLAS on every linear from {frm} rows (rows where it does: {wins})")
summary = {"rows": rows_out, "best": {str(b): list(c) for b, c in best.items()}, "triton_from": frm}
Path(sys.argv[1]).write_text(json.dumps(summary, indent=1))

triton_w8a8.tiles = lambda m: best[bucket(m)]
linear.W8A8Linear.TRITON_FROM = frm if frm is not None else 1 << 30
print(f"end to end with TRITON_FROM {linear.W8A8Linear.TRITON_FROM} and tiles {best}", flush=True)
from bench import torch_bench  # noqa: E402

sys.argv = [sys.argv[0], *sys.argv[sys.argv.index("--") + 1 :]]
torch_bench.main()
