"""bench/torch_bench.py with another plan for the decode attention than attention.decode_plan, for an A/B in one
call: PLAN=old, sessions 9-38's (num_splits' context splits, one cache block an iteration); PLAN=splits, num_splits'
count with at least SPLIT_BLOCKS entries a split and up to ITER_BLOCKS blocks an iteration at every width (no
single split for narrow tables). Usage: PLAN=old python3 bench/results/s39_plan.py <torch_bench arguments>."""

import os
import runpy
import sys

from lorafast_export.runtime import attention, paged


def _old(batch, kv_heads, width, sms=132):
    return attention.num_splits(batch, kv_heads, width, sms), 1


def _splits(batch, kv_heads, width, sms=132):
    splits = max(1, min(attention.num_splits(batch, kv_heads, width, sms), width // attention.SPLIT_BLOCKS))
    return splits, max(1, min(attention.ITER_BLOCKS, -(-width // splits)))


attention.decode_plan = paged.decode_plan = {"old": _old, "splits": _splits}[os.environ["PLAN"]]
sys.argv = ["bench/torch_bench.py", *sys.argv[1:]]
runpy.run_path("bench/torch_bench.py", run_name="__main__")
