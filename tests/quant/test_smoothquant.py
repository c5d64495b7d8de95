import pytest
import torch

from lorafast_export.errors import InputError
from lorafast_export.qform import QLinear, dequantize
from lorafast_export.quant.smoothquant import (
    fold_scale_into_previous,
    quantize_w8a8,
    smooth_scales,
    weight_input_absmax,
)
from tests.quant.helpers import correlated_inputs


def rms_norm(x, weight, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def layer(seed=0):
    g = torch.Generator().manual_seed(seed)
    h = correlated_inputs(128, 64, seed=seed, outlier_channels=3)
    norm_w = torch.rand(64, generator=g) + 0.5
    ws = [torch.randn(n, 64, generator=g) * 0.05 for n in (64, 32)]
    return h, norm_w, ws


def test_smooth_scales_formula():
    a, w = torch.tensor([4.0, 1.0, 0.0]), torch.tensor([1.0, 4.0, 2.0])
    s = smooth_scales(a, w, alpha=0.5)
    assert torch.allclose(s[:2], torch.tensor([2.0, 0.5]))
    assert s[2] > 0  # a dead channel still gets a positive, finite scale
    with pytest.raises(InputError, match="alpha"):
        smooth_scales(a, w, alpha=1.5)


def test_smoothing_fold_leaves_unrounded_output_unchanged():
    h, norm_w, ws = layer()
    x = rms_norm(h, norm_w)
    s = smooth_scales(x.abs().amax(dim=0), weight_input_absmax(ws), alpha=0.5)
    f = fold_scale_into_previous(norm_w, ws, s)
    x_s = rms_norm(h, f.prev_weight)
    for w, w_s in zip(ws, f.linears):
        assert torch.allclose(x @ w.T, x_s @ w_s.T, rtol=1e-4, atol=1e-4)
    assert x_s.abs().amax() < x.abs().amax()  # outliers migrated into the weights


def test_w8a8_close_to_fp_and_smoothing_helps():
    h, norm_w, ws = layer(seed=1)
    x = rms_norm(h, norm_w)
    s = smooth_scales(x.abs().amax(dim=0), weight_input_absmax(ws), alpha=0.5)
    f = fold_scale_into_previous(norm_w, ws, s)
    x_s = rms_norm(h, f.prev_weight)
    errs_smooth, errs_plain = [], []
    for w, w_s in zip(ws, f.linears):
        ref = x @ w.T
        qt = quantize_w8a8(w_s, input_scale=s)
        assert qt.act_quant == "int8_per_token_dynamic" and torch.equal(qt.input_scale, s)
        out = QLinear(qt)(x_s)
        errs_smooth.append(float((out - ref).norm() / ref.norm()))
        errs_plain.append(float((QLinear(quantize_w8a8(w))(x) - ref).norm() / ref.norm()))
        assert torch.allclose(dequantize(qt), w_s, atol=float(qt.scales.max()))
    assert max(errs_smooth) < 0.02, errs_smooth
    assert sum(errs_smooth) < sum(errs_plain)
