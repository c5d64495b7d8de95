"""Session 35: W8A8 at 2-24 rows (decode batches) on the 8B linears: W8A8Linear's cuBLAS path (16 zero rows
appended up to 16 rows, torch._int_mm, then the two scales) against our Triton GEMM (runtime/triton_w8a8.launch)
with 16-row tiles and split K, each in a CUDA graph replayed over weight copies (the activation quantization,
the same for both, not included). Writes every config's time and, per row count, the config with the least
summed time over the four linears. python s35_w8a8_small.py OUT.json"""

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from lorafast_export.runtime.kernel_tune import graph_us, n_copies  # noqa: E402
from lorafast_export.runtime.triton_w8a8 import launch  # noqa: E402

dev = torch.device("cuda")
SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
ROWS = (2, 4, 8, 16, 24)
CONFIGS = [  # ((BM, BN, BK, GROUP_M, warps, stages), splits)
    ((16, bn, bk, 1, 4, st), sp)
    for bn in (64, 128)
    for bk in (128, 256)
    for st in (3, 4)
    for sp in (1, 2, 4, 8)
]


def cublas_path(x, w, sx, sw):
    """W8A8Linear's cuBLAS path, which ran every row count below 32 before this sweep."""
    rows = x.shape[0]
    xq = F.pad(x, (0, 0, 0, 16)) if rows <= 16 else x
    acc = torch._int_mm(xq, w.t())[:rows]
    return (acc.float() * sx * sw).to(torch.bfloat16)


def measure(name: str, n: int, k: int) -> list[dict]:
    ws = [torch.randint(-128, 128, (n, k), device=dev, dtype=torch.int8) for _ in range(n_copies(n * k, dev))]
    sw = torch.rand(n, device=dev)
    rows = []
    for m in ROWS:
        x = torch.randint(-127, 128, (m, k), device=dev, dtype=torch.int8)
        sx = torch.rand(m, 1, device=dev)
        want = cublas_path(x, ws[0], sx, sw).float()
        row = {
            "linear": name,
            "rows": m,
            "cublas": graph_us(lambda j, x=x, sx=sx: cublas_path(x, ws[j], sx, sw), len(ws)),
        }
        for cfg, sp in CONFIGS:
            y = launch(x, ws[0], sx, sw, torch.bfloat16, cfg, sp).float()
            assert (y - want).abs().max() <= 1e-2 * want.abs().max(), (cfg, sp)
            row[str((cfg, sp))] = graph_us(
                lambda j, x=x, sx=sx, c=cfg, s=sp: launch(x, ws[j], sx, sw, torch.bfloat16, c, s), len(ws)
            )
        rows.append(row)
        best = min((v, c) for c, v in row.items() if c.startswith("(("))
        print(name, m, "cublas", round(row["cublas"], 1), "best", best[1], round(best[0], 1), flush=True)
    return rows


rows = [r for name, (n, k) in SHAPES.items() for r in measure(name, n, k)]
summary = {}
for m in ROWS:
    at = [r for r in rows if r["rows"] == m]
    sums = {c: sum(r[c] for r in at) for c in at[0] if c.startswith("((")}
    best = min(sums, key=sums.get)
    summary[m] = {
        "config": best,
        "sum_us": sums[best],
        "cublas_sum_us": sum(r["cublas"] for r in at),
        "per_linear": {r["linear"]: (round(r[best], 1), round(r["cublas"], 1)) for r in at},
    }
    print(
        "rows",
        m,
        "best summed",
        best,
        round(sums[best], 1),
        "cublas summed",
        round(summary[m]["cublas_sum_us"], 1),
        summary[m]["per_linear"],
        flush=True,
    )
Path(sys.argv[1]).write_text(json.dumps({"rows": rows, "summary": summary}, indent=1))
