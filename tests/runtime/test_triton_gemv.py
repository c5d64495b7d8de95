"""The Triton dense GEMV (runtime/triton_gemv.py) equals the float64 product, and row i of a several-row
call equals the one-row call bit for bit (what a speculative verify needs). CUDA, or the CPU interpreter."""
# ruff: noqa: I001 - tests.runtime.triton_device must be imported before any kernel module

import pytest
import torch

from tests.runtime.triton_device import DEV  # first: sets the interpreter flag before triton loads
from lorafast_export.runtime.triton_gemv import GEMV_TILES, gemv, gemv_launch


@pytest.mark.parametrize("n,k", [(64, 256), (40, 200), (24, 4096 + 64)])  # even; ragged N and K; long K
@pytest.mark.parametrize("rows", [1, 3, 5, 8])
def test_gemv_equals_float64_product(n, k, rows):
    g = torch.Generator().manual_seed(n + k + rows)
    x, w = torch.randn(rows, k, generator=g), torch.randn(n, k, generator=g) * 0.05
    ref = x.double() @ w.double().T
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        xd, wd = x.to(DEV, dtype), w.to(DEV, dtype)
        y = gemv(xd, wd).double().cpu()
        ref_d = xd.double().cpu() @ wd.double().cpu().T  # the product of the rounded inputs
        assert y.shape == (rows, n) and (y - ref_d).abs().max() <= tol * ref.abs().max(), dtype


@pytest.mark.parametrize("tiles", GEMV_TILES[:3])
def test_gemv_rows_are_independent_of_the_other_rows(tiles):
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(5, 512, generator=g), torch.randn(96, 512, generator=g) * 0.05
    x, w = x.to(DEV, torch.bfloat16), w.to(DEV, torch.bfloat16)
    five = gemv_launch(x, w, *tiles)
    for i in range(5):
        assert torch.equal(gemv_launch(x[i : i + 1], w, *tiles)[0], five[i])
    assert torch.equal(gemv_launch(x[:2], w, *tiles), five[:2])


def test_gemv_refuses_too_many_rows():
    with pytest.raises(ValueError, match="at most 8 rows"):
        gemv(torch.zeros(9, 64, device=DEV), torch.zeros(8, 64, device=DEV))
