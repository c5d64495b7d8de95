"""Which int4 kernel runs a linear of a given shape, from a table measured on the GPU (not a guess).

`bench/torch_bench.py --sections int4table` times, per linear shape [N, K] and per row bucket, the dense
bf16 matmul, torch's tinygemm and a sweep of our Triton GEMV/GEMM tiles (runtime/triton_int4.py), each
call replayed from a CUDA graph as the runtime runs it, and writes the table shipped as
lorafast_export/data/kernels/int4_<gpu>.json. At load:
- a layer whose shape the table holds, on the GPU it was measured on, gets the Triton kernels when their
  times over all buckets beat tinygemm's (geometric mean of the ratios; one weight layout per layer), with
  the fastest measured tile for each bucket;
- any other shape or GPU keeps the earlier rule (tinygemm where it applies), since nothing was measured.
"""

from __future__ import annotations

import json
import math
from functools import lru_cache
from pathlib import Path

TABLE_DIR = Path(__file__).resolve().parents[1] / "data" / "kernels"
TRITON_GROUPS = (32, 64, 128, 256)  # group sizes the Triton kernels take (a GEMV tile holds whole groups)


def table_file(gpu: str) -> Path:
    return TABLE_DIR / f"int4_{gpu.lower().replace('nvidia ', '').replace(' ', '_')}.json"


@lru_cache(maxsize=4)
def load_table(gpu: str) -> dict | None:
    path = table_file(gpu)
    return json.loads(path.read_text()) if path.is_file() else None


def _best(cell: dict) -> dict | None:
    """The faster of the cell's measured Triton kernels ({'us', 'entry'}), None if neither ran."""
    runs = [cell[k] for k in ("gemv", "gemm") if cell.get(k) and cell[k]["us"] is not None]
    return min(runs, key=lambda r: r["us"]) if runs else None


def plan_from_table(table: dict | None, n: int, k: int) -> tuple[str, list[int]] | None:
    """('int4_triton', flat plan) or ('int4_tinygemm', []) for an [n, k] linear; None if not measured."""
    row = next((r for r in (table or {}).get("shapes", []) if (r["n"], r["k"]) == (n, k)), None)
    if row is None:
        return None
    buckets = sorted(row["rows"], key=int)
    best = {b: _best(row["rows"][b]) for b in buckets}
    if any(v is None for v in best.values()):
        return ("int4_tinygemm", [])
    tiny = [row["rows"][b].get("tinygemm_us") for b in buckets]
    if all(t is not None for t in tiny):
        log_ratio = sum(math.log(best[b]["us"] / t) for b, t in zip(buckets, tiny))
        if log_ratio >= 0:
            return ("int4_tinygemm", [])
    plan: list[int] = []
    for b in buckets:
        plan += [int(b), *best[b]["entry"][1:]]
    return ("int4_triton", plan)


def default_plan() -> list[int]:
    """Tiles for a forced `kernel=triton` on a shape the table lacks: GEMV up to 4 rows, then GEMM."""
    return [4, 0, 32, 256, 1, 16, 4, 1 << 30, 1, 64, 64, 1, 32, 4]
