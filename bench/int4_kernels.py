"""Measure the int4 kernel table the runtime reads at load (runtime/int4_table.py), on the GPU it serves.

    PYTHONPATH=. python bench/int4_kernels.py --shapes llama3-8b,demo --out int4_h200.json

For each fused linear shape of a model ([N, K]: qkv, o, gate_up, down) and each row bucket, it times the
dense bf16 matmul, torch's tinygemm (where it applies, up to 64 rows), our Triton GEMV / GEMM on qform's
packing (a grid of tiles, or with --reuse-old the shipped table's entry per cell) and the tiled-layout
GEMV_T / GEMM_T over a grid of tiles, options and split counts (every timing kept under 'all'), on RTN
int4 g128 asymmetric codes of a random weight. Row buckets run in the order of --rows, every shape per
bucket, so --budget-s cuts the least important buckets. Every call is replayed from a CUDA
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lorafast_export.runtime.int4_table import load_table, shape_row, table_file  # noqa: E402
from lorafast_export.runtime.kernel_tune import (  # noqa: E402, F401 - graph_us, n_copies, MODELS: bench/*.py
    CELLS,
    MODELS,
    ROW_ORDER,
    Shape,
    graph_us,
    merge,
    n_copies,
    new_table,
    ptx_notes,
    shapes,
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--shapes", default="llama3-8b,demo", help=f"models whose linear shapes to measure: {list(MODELS)}"
    )
    p.add_argument("--out", default="")
    p.add_argument("--budget-s", type=float, default=1e9, help="stop adding shapes after this many seconds")
    p.add_argument("--quick", action="store_true", help="two tiles per kernel, rows 1 and 8 (a dry run)")
    p.add_argument("--rows", default="", help="row buckets, in this order (default: the targets first)")
    p.add_argument(
        "--reuse-old",
        action="store_true",
        help="time the kernels not in --sweep only at the entry the shipped table chose per cell",
    )
    p.add_argument(
        "--sweep", default=",".join(CELLS), help=f"kernel cells swept over their tile grid: {CELLS}"
    )
    p.add_argument(
        "--merge-into",
        default="",
        help="also write the shipped table with this run's measured cells replacing its own (other buckets kept)",
    )
    p.add_argument("--with-head", action="store_true", help="also the lm_head shape [vocab, hidden]")
    a = p.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu-interpreter"
    table = new_table(gpu)
    out = Path(a.out or table_file(gpu).name)
    old = load_table(gpu) if a.reuse_old else None
    sms = torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 132
    t0 = time.perf_counter()
    measured = [
        Shape(n, k, dev, model) for model in a.shapes.split(",") for n, k in shapes(model, a.with_head)
    ]
    rows = [int(r) for r in a.rows.split(",")] if a.rows else ((1, 8) if a.quick else ROW_ORDER)
    for m in rows:
        for sh in measured:
            if time.perf_counter() - t0 > a.budget_s:
                print(f"budget: skipped {sh.n}x{sh.k} rows {m}", flush=True)
                continue
            prev = shape_row(old, sh.n, sh.k)
            sh.measure(m, a.quick, (prev or {}).get("rows", {}).get(str(m)), sms, tuple(a.sweep.split(",")))
            table["shapes"] = [x.row() for x in measured if x.cells]
            out.write_text(json.dumps(table, indent=1))
            if a.merge_into:
                merge(load_table(gpu) or {}, table, Path(a.merge_into))
    table["ptx"] = ptx_notes() if dev.type == "cuda" else {}
    out.write_text(json.dumps(table, indent=1))
    print(f"wrote {out} in {time.perf_counter() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
