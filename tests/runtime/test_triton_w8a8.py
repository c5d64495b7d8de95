"""Our Triton W8A8 GEMM and GEMV (runtime/triton_w8a8.py) compute the exact int8 product with both scales, and
a SmoothQuant layer's prefill and decode rows through them equal its int8 GEMM's (torch._int_mm) up to one
rounding of the output.

Runs on CUDA, or on the CPU through Triton's interpreter (tests/runtime/triton_device.py)."""
# ruff: noqa: I001 - tests.runtime.triton_device must be imported before any kernel module

import pytest
import torch

from tests.runtime.triton_device import DEV  # first: sets the interpreter flag before triton loads
from lorafast_export.qform import QLinear, with_fields
from lorafast_export.runtime.linear import lower_qtensor
from lorafast_export.runtime import triton_w8a8
from lorafast_export.runtime.triton_w8a8 import gemv, gemv_config, gemv_splits, launch, tiles
from tests.runtime.test_linear import w8a8_qtensor

CONFIGS = [None, (16, 32, 32, 1, 4, 1), (32, 16, 64, 2, 4, 2)]  # None: the rule's tiles for the row count


@pytest.mark.parametrize("m,n,k", [(5, 48, 256), (70, 40, 200), (300, 64, 136)])  # ragged M, N and K tiles
@pytest.mark.parametrize("config", CONFIGS, ids=["rule", "small", "grouped"])
@pytest.mark.parametrize("splits", [1, 3])  # split K: int32 partials, summed and scaled after
def test_w8a8_gemm_is_the_exact_product_times_the_scales(m, n, k, config, splits):
    g = torch.Generator().manual_seed(m)
    x = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8)
    w = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    x[0] = 127
    w[0] = -128  # the largest sums the codes allow
    sx, sw = torch.rand(m, 1, generator=g), torch.rand(n, generator=g) - 0.5
    ref = (x.double() @ w.double().T) * sx.double() * sw.double()
    got = launch(x.to(DEV), w.to(DEV), sx.to(DEV), sw.to(DEV), torch.float32, config, splits).double().cpu()
    assert (got - ref).abs().max() <= 1e-6 * ref.abs().max()


GEMV_CONFIGS = [None, (16, 64, 3, 4), (32, 1024, 2, 4)]  # (BN, BK, splits, warps); None: the rule's


@pytest.mark.parametrize("m,n,k", [(1, 48, 256), (3, 40, 200), (4, 64, 2304)])  # ragged N and K tiles
@pytest.mark.parametrize("config", GEMV_CONFIGS, ids=["rule", "split", "widest"])
def test_w8a8_gemv_is_the_exact_product_times_the_scales(m, n, k, config):
    """The GEMV's int32 sums equal the int64 product exactly (scales 1; the codes' extremes over all of K, past
    2**24 at k = 2304, so float32 sums of more than one tile would round), and with scales, the scaled product."""
    g = torch.Generator().manual_seed(m)
    x = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8)
    w = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    x[0], w[0] = 127, -128
    exact = (x.long() @ w.long().T).to(torch.int32)
    ones_m, ones_n = torch.ones(m, 1), torch.ones(n)
    got = gemv(x.to(DEV), w.to(DEV), ones_m.to(DEV), ones_n.to(DEV), torch.float32, config).cpu()
    assert torch.equal(got, exact.float())
    sx, sw = torch.rand(m, 1, generator=g), torch.rand(n, generator=g) - 0.5
    want = exact.float() * sx * sw  # W8A8Linear's cuBLAS path: int32 sums, then the two scales in this order
    got = gemv(x.to(DEV), w.to(DEV), sx.to(DEV), sw.to(DEV), torch.float32, config).cpu()
    assert torch.equal(got, want) if DEV == "cpu" else (got - want).abs().max() <= 1e-6 * want.abs().max()


def test_gemv_splits_fill_the_gpu():
    """Split K until three programs per SM (132 SMs: the 8B shapes' qkv, o and down split 4, gate_up 1);
    none without an SM count (the interpreter) or where K holds too few tiles."""
    assert [
        gemv_splits(n, k, 132) for n, k in ((6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336))
    ] == [
        4,
        4,
        1,
        4,
    ]
    assert gemv_splits(4096, 4096, None) == 1 and gemv_splits(4096, 512, 132) == 1
    assert gemv_config(28672, 4096, 132) == (32, 256, 1, 4) and gemv_config(4096, 14336, 132) == (
        16,
        512,
        4,
        4,
    )


def test_wide_offsets_compute_the_same_product(monkeypatch):
    """Past 2**31 elements the kernel offsets in 64 bits (WIDE); forced on a small product it gives the same."""
    g = torch.Generator().manual_seed(1)
    x = torch.randint(-127, 128, (20, 64), generator=g, dtype=torch.int8).to(DEV)
    w = torch.randint(-128, 128, (48, 64), generator=g, dtype=torch.int8).to(DEV)
    sx, sw = torch.rand(20, 1, generator=g).to(DEV), torch.rand(48, generator=g).to(DEV)
    narrow = launch(x, w, sx, sw, torch.float32, (16, 32, 32, 1, 4, 1))
    assert not triton_w8a8._wide(20, 48, 64) and triton_w8a8._wide(1 << 17, 1 << 14, 4096)
    monkeypatch.setattr(triton_w8a8, "_wide", lambda m, n, k: True)
    assert torch.equal(launch(x, w, sx, sw, torch.float32, (16, 32, 32, 1, 4, 1)), narrow)


def test_tiles_cover_every_row_count_and_fit_the_shared_memory():
    for m in (1, 2, 16, 17, 32, 64, 65, 256, 257, 10_000):
        (bm, bn, bk, group_m, warps, stages), splits = tiles(m)
        assert min(bm, bn, bk) >= 16 and group_m >= 1 and warps in (4, 8) and stages >= 1 and splits >= 1
        for smem in (100 * 1024, 164 * 1024):  # consumer Ampere / Ada, A100
            fitted, fitted_splits = tiles(m, smem)
            assert fitted[:5] == (bm, bn, bk, group_m, warps) and 1 <= fitted[5] <= stages
            assert fitted[5] * (bm + bn) * bk <= smem or fitted[5] == 1
            assert fitted_splits == splits


@pytest.mark.parametrize("rows", [1, 2, 16, 24, 35])  # the GEMV, 16-row tiles split K, cuBLAS's rows, prefill
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_w8a8_linear_rows_equal_the_int8_gemm(dtype, rows):
    """W8A8Linear with triton (on CUDA) runs our kernels outside CUBLAS_ROWS: the same int32 sums and float32 scaling as
    its torch._int_mm path on the same device, so the same outputs up to one rounding of the output (bf16:
    Triton's interpreter rounds to bf16 toward zero, the GPU to nearest; float32 on the GPU: the scaling's
    order of operations), and the fake-quant reference's product."""
    qt = w8a8_qtensor(out=64, in_=256)
    mod = lower_qtensor(qt, "cpu", dtype).to(DEV)
    mod.bias, qt = (
        None,
        with_fields(qt, bias=None),
    )  # compared within a step of the product: no bias added after
    x = (torch.randn(rows, 256) * 3).to(dtype)
    mod.triton, mod.pad = False, DEV == "cuda"  # cuBLAS's int8 GEMM takes more than 16 rows
    want = mod(x.to(DEV)).cpu()
    mod.triton = True
    got = mod(x.to(DEV)).cpu()
    if DEV == "cpu" and dtype == torch.float32:
        assert torch.equal(got, want)
    step = 2**-7 if dtype == torch.bfloat16 else 2**-22  # a relative step of the output's precision, doubled
    assert ((got.float() - want.float()).abs() <= want.float().abs() * step).all()
    ref = QLinear(qt)(x.float())
    assert (got.float() - ref).abs().max() <= (1e-6 if dtype == torch.float32 else 8e-3) * ref.abs().max()
