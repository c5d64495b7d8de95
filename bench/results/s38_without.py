"""bench/torch_bench.py without session 38's two decode-step changes, for an A/B in one call: the rotary's cos and
sin computed every step (RopeTable looks them up) and the final norm as torch's ops (the add_rms_norm kernel off).
Usage: python3 bench/results/s38_without.py <torch_bench arguments>."""

import runpy
import sys

from lorafast_export.runtime import loader, paged

paged.RopeTable.forward = lambda self, position_ids, dtype: self.rotary(position_ids, dtype)
_use = paged.use_fused_decode


def _without_norm_kernel(dec, *args, **kwargs):
    n = _use(dec, *args, **kwargs)
    dec.norm_kernel = False
    return n


paged.use_fused_decode = loader.use_fused_decode = _without_norm_kernel
sys.argv = ["bench/torch_bench.py", *sys.argv[1:]]
runpy.run_path("bench/torch_bench.py", run_name="__main__")
