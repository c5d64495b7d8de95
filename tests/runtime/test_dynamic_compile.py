"""The runtime compiles its layers with the row count dynamic. A Triton-backed linear's Python (its choice of kernel
by row count, its plan lookups) must trace on a symbolic count, and fullgraph: a graph break there is a silent
slowdown, a trace error a failed runtime. These branches run only where Triton does, so on the CPU they are
compiled here through Triton's interpreter (session 36: W8A8Linear's `rows in range(...)` failed on the GPU only).

Runs on CUDA, or on the CPU through Triton's interpreter (tests/runtime/triton_device.py)."""
# ruff: noqa: I001 - tests.runtime.triton_device must be imported before any kernel module

import pytest
import torch

from tests.runtime.triton_device import DEV  # first: sets the interpreter flag before triton loads
from lorafast_export.quant.rtn import quantize_rtn
from lorafast_export.runtime import triton_w8a8  # noqa: F401  (registers the W8A8 op a CPU-lowered layer skips)
from lorafast_export.runtime.linear import lower_qtensor
from tests.runtime.test_linear import w8a8_qtensor


def _lowered(kind: str):
    torch.manual_seed(0)
    if kind == "w8a8":
        mod = lower_qtensor(w8a8_qtensor(out=64, in_=256), "cpu", torch.float32).to(DEV)
        mod.triton, mod.pad = True, DEV == "cuda"  # our kernels as on CUDA
        return mod
    bits, group = (4, 128) if kind == "int4_triton" else (8, -1)
    qt = quantize_rtn(torch.randn(64, 256), bits, group, False)
    return lower_qtensor(qt, DEV, torch.float32, prefer="triton")


@pytest.mark.parametrize("kind", ["int4_triton", "int8_triton", "w8a8"])
def test_triton_linears_compile_over_dynamic_row_counts(kind):
    torch._dynamo.reset()
    mod = _lowered(kind)
    assert mod.kernel == kind
    compiled = torch.compile(mod, backend="eager", dynamic=True, fullgraph=True)
    for rows in (1, 3, 24, 40):  # the GEMV, small tiles, cuBLAS's W8A8 rows, prefill tiles
        x = torch.randn(rows, 256).to(DEV)
        assert torch.equal(compiled(x), mod(x)), rows
