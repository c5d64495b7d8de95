"""bench/torch_bench.py with sessions 9-38's plan for the decode attention (attention.num_splits' context splits, one
cache block an iteration) in place of attention.decode_plan, for an A/B in one call.
Usage: python3 bench/results/s39_plan.py <torch_bench arguments>."""

import runpy
import sys

from lorafast_export.runtime import attention, paged


def _old_plan(num_splits):
    def plan(batch, kv_heads, width, sms=132):  # a closure: dynamo traces it inside paged_layer
        return num_splits(batch, kv_heads, width, sms), 1

    return plan


attention.decode_plan = paged.decode_plan = _old_plan(attention.num_splits)
sys.argv = ["bench/torch_bench.py", *sys.argv[1:]]
runpy.run_path("bench/torch_bench.py", run_name="__main__")
