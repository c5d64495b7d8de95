"""Session 35: the W8A8 GEMV's tiles (BN, BK, splits, warps) at one row on the 8B linears, against the rule's
(runtime/triton_w8a8.gemv_splits) and cuBLAS's padded int8 GEMM (torch._int_mm on 17 rows), each kernel alone
(the activation quantization not included), CUDA-graph replay over weight copies. python s35_w8a8_gemv.py OUT.json"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from lorafast_export.runtime.kernel_tune import graph_us, n_copies  # noqa: E402
from lorafast_export.runtime.triton_w8a8 import GEMV_BK, GEMV_BN, GEMV_WARPS, gemv, gemv_splits  # noqa: E402

dev = torch.device("cuda")
sms = torch.cuda.get_device_properties(dev).multi_processor_count
SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}


def measure(name: str, n: int, k: int) -> dict:
    """One linear's row: cuBLAS's padded int8 GEMM and every GEMV config at one row, microseconds."""
    ws = [torch.randint(-128, 128, (n, k), device=dev, dtype=torch.int8) for _ in range(n_copies(n * k, dev))]
    sw = torch.rand(n, device=dev)
    x = torch.randint(-127, 128, (1, k), device=dev, dtype=torch.int8)
    sx = torch.rand(1, 1, device=dev)

    def cublas(j):
        return torch._int_mm(torch.nn.functional.pad(x, (0, 0, 0, 16)), ws[j].t())

    want = cublas(0)[:1].float() * sx * sw
    row = {"linear": name, "cublas_padded": graph_us(cublas, len(ws))}
    rule = (GEMV_BN, GEMV_BK, gemv_splits(n, k, sms), GEMV_WARPS)  # call 4's rule (gemv_config since)
    grid = {
        (bn, bk, sp, w) for bn in (16, 32, 64) for bk in (256, 512) for sp in (1, 2, 4, 8) for w in (2, 4)
    }
    for c in sorted(grid | {rule}):
        y = gemv(x, ws[0], sx, sw, torch.bfloat16, c)
        assert (y.float() - want).abs().max() <= 1e-2 * want.abs().max(), c
        row[str(c)] = graph_us(lambda j, c=c: gemv(x, ws[j], sx, sw, torch.bfloat16, c), len(ws))
    row["rule"], row["rule_us"] = str(rule), row[str(rule)]
    row["best_us"], row["best"] = min((v, c) for c, v in row.items() if c.startswith("("))
    return row


rows = []
for name, (n, k) in SHAPES.items():
    r = measure(name, n, k)
    print(name, "cublas", round(r["cublas_padded"], 1), "rule", r["rule"], round(r["rule_us"], 1), "best", r["best"],
          round(r["best_us"], 1), flush=True)  # fmt: skip
    rows.append(r)
Path(sys.argv[1]).write_text(json.dumps(rows, indent=1))
