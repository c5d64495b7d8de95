import pytest
import torch

from lorafast_export.errors import InputError
from lorafast_export.qform import dequantize, group_index, n_groups_for
from lorafast_export.quant.int8 import quantize_int8_weight
from lorafast_export.quant.rtn import group_minmax, qparams, quantize_codes, quantize_rtn


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [-1, 16, 24])
def test_rtn_error_is_at_most_half_a_step(bits, symmetric, group_size):
    w = torch.randn(12, 72, generator=torch.Generator().manual_seed(bits + group_size)) * 0.05
    w[3] += 0.3  # an all-positive row: asymmetric must still represent 0
    qt = quantize_rtn(w, bits, group_size, symmetric)
    assert (qt.zeros is None) == symmetric
    assert qt.scales.dtype == torch.float16 and qt.scales.shape == (12, qt.n_groups)
    step = qt.scales.float()[:, group_index(72, group_size)]
    err = (dequantize(qt) - w).abs()
    assert torch.all(err <= step * 0.51), float((err / step).max())
    if symmetric:  # absmax maps to ±(2**(bits-1) - 1): code 0 unused, no clipping
        assert int(qt.codes.min()) >= 1


@pytest.mark.parametrize("symmetric", [True, False])
def test_rtn_keeps_zero_exact(symmetric):
    w = torch.randn(4, 32)
    w[:, ::5] = 0.0
    assert torch.all(dequantize(quantize_rtn(w, 4, 8, symmetric))[:, ::5] == 0)


def test_rtn_constant_and_zero_rows_do_not_divide_by_zero():
    w = torch.zeros(3, 16)
    w[1] = 2.0
    qt = quantize_rtn(w, 4, -1, symmetric=False)
    assert torch.isfinite(qt.scales.float()).all()
    assert torch.allclose(dequantize(qt), w, atol=2e-3 * 2)


def test_asymmetric_beats_symmetric_on_shifted_weights():
    w = torch.rand(16, 64) * 0.1 + 0.05
    err = {s: float((dequantize(quantize_rtn(w, 4, 32, s)) - w).pow(2).mean()) for s in (True, False)}
    assert err[False] < err[True]


def test_int8_weight_is_per_channel_symmetric():
    w = torch.randn(10, 40)
    qt = quantize_int8_weight(w)
    assert qt.bits == 8 and qt.group_size == -1 and qt.zeros is None and qt.scales.shape == (10, 1)
    assert torch.allclose(qt.scales[:, 0], w.abs().amax(dim=1) / 127)
    assert float((dequantize(qt) - w).abs().max()) <= float(qt.scales.max()) / 2 * 1.001


def test_rtn_rejects_bad_arguments_naming_them():
    with pytest.raises(InputError) as e:
        quantize_rtn(torch.randn(4, 8), bits=3, group_size=0, symmetric=True)
    assert "bits=3" in str(e.value) and "group_size=0" in str(e.value)
    with pytest.raises(InputError, match="NaN"):
        quantize_rtn(torch.tensor([[float("nan"), 1.0]]), 4, -1, True)
    with pytest.raises(InputError, match="float32"):
        quantize_rtn(torch.full((2, 2), 1e6), 4, -1, True)  # scale 1.4e5 overflows float16


@pytest.mark.parametrize("group_size,symmetric", [(32, True), (32, False), (-1, False), (-1, True)])
def test_whole_groups_take_a_reshape_with_the_scatter_path_s_values(group_size, symmetric):
    w = torch.randn(40, 96, generator=torch.Generator().manual_seed(3)) * 0.1
    qt = quantize_rtn(w, 4, group_size, symmetric)
    g = group_index(96, group_size)
    scale, zero = qparams(*group_minmax(w, g, n_groups_for(96, group_size)), 4, symmetric)
    assert torch.equal(qt.scales, scale) and (zero is None) == (qt.zeros is None)
    assert zero is None or torch.equal(qt.zeros, zero)
    assert torch.equal(qt.codes, quantize_codes(w, scale[:, g], None if zero is None else zero[:, g], 4))
