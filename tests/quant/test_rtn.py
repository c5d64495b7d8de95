import pytest
import torch

from lorafast_export.errors import InputError
from lorafast_export.qform import dequantize, group_index, n_groups_for
from lorafast_export.quant.int8 import quantize_int8_weight
from lorafast_export.quant.rtn import fake_quantize_rtn, group_minmax, qparams, quantize_codes, quantize_rtn


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [-1, 16, 24])
def test_rtn_error_is_at_most_half_a_step(bits, symmetric, group_size):
    w = torch.randn(12, 72, generator=torch.Generator().manual_seed(bits + group_size)) * 0.05
    w[3] += 0.3  # an all-positive row: asymmetric must still represent 0
    qt = quantize_rtn(w, bits, group_size, symmetric)
    assert (qt.zeros is None) == symmetric
    assert qt.scales.dtype == torch.float16 and qt.scales.shape == (12, qt.n_groups)
    step = qt.scales.float()[:, group_index(72, group_size)].abs()  # symmetric scales carry a sign
    err = (dequantize(qt) - w).abs()
    if symmetric:  # the signed grid clips only the far side of the extreme, beyond (2**(bits-1) - 1/2) steps
        clipped = (w / qt.scales.float()[:, group_index(72, group_size)]) > 2 ** (bits - 1) - 0.5
        assert torch.all(err[clipped] <= step[clipped] * 1.001)
        err, step = err[~clipped], step[~clipped]
        assert int(qt.codes.min()) == 0  # the full range: signed -2**(bits-1) is used
    assert torch.all(err <= step * 0.51), float((err / step).max())


def _signed_grid_reference(w: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """NNCF's symmetric rule written out group by group: the value of largest magnitude, with its sign, is
    -2**(bits-1) steps; everything else rounds to nearest and saturates to the signed range."""
    half = 2 ** (bits - 1)
    codes, scales = torch.empty(w.shape, dtype=torch.uint8), []
    for o in range(w.shape[0]):
        row = []
        for c0 in range(0, w.shape[1], group_size):
            grp = w[o, c0 : c0 + group_size]
            extreme = grp[grp.abs().argmax()]
            s = extreme / -half if extreme != 0 else torch.tensor(torch.finfo(torch.float32).tiny)
            codes[o, c0 : c0 + group_size] = (torch.round(grp / s).clamp(-half, half - 1) + half).to(
                torch.uint8
            )
            row.append(s)
        scales.append(torch.stack(row))
    return codes, torch.stack(scales)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [16, 24])
def test_symmetric_grid_is_the_signed_extreme_rule(bits, group_size):
    """Symmetric codes and scales equal a group-by-group reference of the signed-extreme rule (float32 scales, so
    no scale rounding is involved); each group's extreme is exactly code 0 (signed -2**(bits-1)), and scales are
    negative exactly where the extreme is positive."""
    w = torch.randn(9, 72, generator=torch.Generator().manual_seed(bits)) * 0.05
    w[2] = w[2].abs()  # a row whose extremes are all positive: negative scales
    w[5, :group_size] = 0.0  # an all-zero group
    qt = quantize_rtn(w, bits, group_size, True, scale_dtype=torch.float32)
    codes, scales = _signed_grid_reference(w, bits, group_size)
    assert torch.equal(qt.scales, scales) and torch.equal(qt.codes, codes)
    assert bool((qt.scales[2] < 0).all()) and bool((qt.scales[[0, 1, 3]] != 0).all())
    assert torch.equal(dequantize(qt)[5, :group_size], torch.zeros(group_size))
    for c0 in range(0, 72, group_size):  # the ragged last group too
        grp, codes_g = w[:, c0 : c0 + group_size], qt.codes[:, c0 : c0 + group_size]
        at = grp.abs().argmax(dim=1, keepdim=True)
        nonzero = grp.abs().amax(dim=1) > 0
        assert bool((codes_g.gather(1, at)[nonzero] == 0).all())  # each extreme is signed -2**(bits-1)


def test_symmetric_fp16_scales_round_their_magnitude_up():
    """fp16 scales: |scale| is the smallest fp16 >= |extreme| / 8, so the extreme still lands on -8 (code 0),
    never beyond the range, whatever its sign."""
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(1)) * 0.03
    w[::2] = -w[::2]
    qt = quantize_rtn(w, 4, 32, True)
    extreme = torch.gather(w.reshape(64, 4, 32), 2, w.reshape(64, 4, 32).abs().argmax(2, keepdim=True))[
        ..., 0
    ]
    s = qt.scales.float()
    assert torch.equal(torch.sign(s), -torch.sign(extreme))
    assert bool((s.abs() >= extreme.abs() / 8).all()) and bool((s.abs().half().float() == s.abs()).all())
    below = torch.nextafter(s.abs().half(), torch.zeros((), dtype=torch.float16)).float()
    assert bool((below < extreme.abs() / 8).all())  # the smallest such fp16


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
    extreme = w.gather(1, w.abs().argmax(dim=1, keepdim=True))[:, 0]
    assert torch.allclose(qt.scales[:, 0], extreme / -128)  # signed: the extreme is code 0 (int8 -128)
    step = qt.scales.abs()
    far = (w / qt.scales) > 127.5  # the far side of the extreme, beyond 127.5 steps, saturates at 127
    err = (dequantize(qt) - w).abs()
    assert bool((err[~far] <= (step / 2 * 1.001).expand_as(w)[~far]).all())
    assert bool((err[far] <= step.expand_as(w)[far] * 1.001).all())


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


@pytest.mark.parametrize(
    "shape, group_size", [((16, 256), 128), ((16, 200), 128), ((16, 200), -1), ((8, 96), 32)]
)
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", [4, 8])
def test_fake_quantize_is_dequantize_of_quantize(shape, group_size, symmetric, bits):
    """AWQ's short way (no QTensor; a ragged last group filled with copies of its last column) gives exactly the
    values of the quantizer's own codes and scales, a dead (all-zero) group included."""
    w = torch.randn(shape, generator=torch.Generator().manual_seed(bits)) * 0.05
    w[0, :40] = 0.0
    w[1, -5:] = 3.0  # an outlier in the ragged last group
    expected = dequantize(quantize_rtn(w, bits, group_size, symmetric))
    assert torch.equal(fake_quantize_rtn(w, bits, group_size, symmetric), expected)
