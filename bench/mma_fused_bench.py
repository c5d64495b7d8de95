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
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lorafast_export.runtime.int4_table import load_table  # noqa: E402
from lorafast_export.runtime.kernel_tune import (  # noqa: E402
    MODELS,
    fused_ops,
    fused_weight,
    measure_fused,
    merge_fused,
    mma_entry,
    n_copies,
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="1,8")
    p.add_argument("--out", default="")
    p.add_argument("--merge-into", default="", help="the int4 table to write the 1-row layouts into")
    a = p.parse_args()
    dev = torch.device("cuda")
    dims = MODELS["llama3-8b"]
    table = load_table(torch.cuda.get_device_name()) or {}
    out = {"gpu": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"), "results": []}
    for op, (n, k) in fused_ops(dims).items():
        ws = [fused_weight(n, k, dev) for _ in range(n_copies(n * k // 2, dev))]
        for m in (int(r) for r in a.rows.split(",")):
            r = measure_fused(op, ws, m, mma_entry(table, n, k, m), dims[2:])
            print(json.dumps({**r, "fused": r["fused"][:5]}), flush=True)
            out["results"].append(r)
            if a.out:
                Path(a.out).write_text(json.dumps(out, indent=1))
    if a.merge_into:
        merge_fused(Path(a.merge_into), out)


if __name__ == "__main__":
    main()
