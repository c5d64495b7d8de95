"""Session 34: where a SmoothQuant layer's time goes at prefill row counts on CUDA (W8A8Linear was 0.53-0.67x
bf16 at 256 rows in call 2, 1.1-1.9x at 1-32 rows). Per 8B linear and row count, CUDA-graph replay over weight
copies (runtime/kernel_tune.graph_us), us per call: bf16 F.linear; torch._int_mm alone on int8 codes (the
weight [n, k] row-major passed transposed, as W8A8Linear does, and [k, n] row-major); the int32 -> bf16
epilogue alone; W8A8Linear compiled (pad 16 rows always: the committed code; pad only at <= 16 rows); and
with inductor's force_fuse_int_mm_with_mul. python bench/results/s34_intmm.py OUT.json"""

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from lorafast_export.qform import ACT_QUANT_INT8_PER_TOKEN, with_fields  # noqa: E402
from lorafast_export.quant.rtn import quantize_rtn  # noqa: E402
from lorafast_export.runtime import linear  # noqa: E402
from lorafast_export.runtime.kernel_tune import graph_us  # noqa: E402

torch._dynamo.config.recompile_limit = 1024
dev = torch.device("cuda")
SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
ROWS = [1, 17, 32, 256, 272, 1024, 4096]
out = []


class PadWhenSmall(linear.W8A8Linear):
    def forward(self, x):
        shape, x = x.shape, x.reshape(-1, self.in_features)
        codes, scale = linear.int8_per_token(x)
        xq = codes.to(torch.int8)
        small = x.shape[0] <= 16
        if small:
            xq = F.pad(xq, (0, 0, 0, 16))
        acc = torch._int_mm(xq, self.weight.t())
        if small:
            acc = acc[: x.shape[0]]
        return self._finish((acc.float() * scale * self.scales).to(x.dtype), shape)


for name, (n, k) in SHAPES.items():
    torch.manual_seed(0)
    w = torch.randn(n, k, device=dev) * 0.02
    qt = with_fields(quantize_rtn(w, 8, -1, True), act_quant=ACT_QUANT_INT8_PER_TOKEN)
    copies = 3
    wb = [w.bfloat16().clone() for _ in range(copies)]
    wq = [(qt.codes.to(torch.int16) - 128).to(torch.int8).contiguous() for _ in range(copies)]
    wq_kn = [t.t().contiguous() for t in wq]
    mods = {
        "w8a8_pad_always": [
            torch.compile(linear.W8A8Linear(qt, None, torch.bfloat16, dev)) for _ in range(copies)
        ],
        "w8a8_pad_small": [torch.compile(PadWhenSmall(qt, None, torch.bfloat16, dev)) for _ in range(copies)],
    }
    for m in ROWS:
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        mp = max(m, 17)
        xi = torch.randint(-127, 128, (mp, k), device=dev, dtype=torch.int8)
        acc = torch.randint(-(2**20), 2**20, (m, n), device=dev, dtype=torch.int32)
        sx = torch.rand(m, 1, device=dev)
        sw = torch.rand(n, device=dev)
        row = {"linear": name, "n": n, "k": k, "rows": m}
        row["bf16"] = graph_us(lambda j, x=x, wb=wb: F.linear(x, wb[j]), copies)
        row[f"int_mm_{mp}rows_weight_nk_t"] = graph_us(
            lambda j, xi=xi, wq=wq: torch._int_mm(xi, wq[j].t()), copies
        )
        try:
            row[f"int_mm_{mp}rows_weight_kn"] = graph_us(
                lambda j, xi=xi, wq_kn=wq_kn: torch._int_mm(xi, wq_kn[j]), copies
            )
        except RuntimeError as e:
            row["int_mm_weight_kn_error"] = str(e)[:200]
        row["epilogue_eager"] = graph_us(lambda j, a=acc, s=sx, sw=sw: (a.float() * s * sw).bfloat16(), 1)
        for kind, ms in mods.items():
            with torch.no_grad():
                ms[0](x)
                row[kind] = graph_us(lambda j, x=x, ms=ms: ms[j](x), copies)
        out.append(row)
        print(json.dumps(row), flush=True)
    del mods, wb, wq, wq_kn
torch._dynamo.reset()
torch._inductor.config.force_fuse_int_mm_with_mul = True
for name, (n, k) in SHAPES.items():
    torch.manual_seed(0)
    qt = with_fields(
        quantize_rtn(torch.randn(n, k, device=dev) * 0.02, 8, -1, True), act_quant=ACT_QUANT_INT8_PER_TOKEN
    )
    ms = [torch.compile(PadWhenSmall(qt, None, torch.bfloat16, dev)) for _ in range(3)]
    for m in ROWS:
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        try:
            with torch.no_grad():
                ms[0](x)
                us = graph_us(lambda j, x=x, ms=ms: ms[j](x), 3)
        except Exception as e:  # noqa: BLE001
            us = f"{type(e).__name__}: {str(e)[:200]}"
        row = {"linear": name, "rows": m, "w8a8_pad_small_fused_mul": us}
        out.append(row)
        print(json.dumps(row), flush=True)
Path(sys.argv[1]).write_text(json.dumps(out, indent=1))
