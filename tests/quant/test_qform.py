import pytest
import torch
import torch.nn.functional as F

from lorafast_export.errors import InputError
from lorafast_export.qform import (
    QLinear,
    QTensor,
    act_order_perm,
    dequantize,
    fake_quant_int8_per_token,
    load_qtensors,
    pad_qtensor,
    save_qtensors,
    with_fields,
    zero_points,
)
from tests.quant.helpers import assert_same_qtensor, random_qtensor


def test_dequantize_formula_by_hand():
    codes = torch.tensor([[0, 3, 15, 7]], dtype=torch.uint8)
    qt = QTensor(
        codes=codes,
        scales=torch.tensor([[0.5, 2.0]]),
        zeros=torch.tensor([[1, 8]], dtype=torch.uint8),
        bits=4,
        group_size=2,
    )
    assert torch.equal(dequantize(qt), torch.tensor([[-0.5, 1.0, 14.0, -2.0]]))


def test_symmetric_means_implicit_zero_half_range():
    sym = random_qtensor(8, 32, bits=4, group_size=16, symmetric=True)
    explicit = with_fields(sym, zeros=zero_points(sym))
    assert torch.all(zero_points(sym) == 8)
    assert torch.equal(dequantize(sym), dequantize(explicit))


def test_act_order_groups_follow_g_idx():
    qt = random_qtensor(4, 24, bits=4, group_size=8, symmetric=False, act_order=True)
    w = dequantize(qt)
    for c in range(24):
        g = int(qt.g_idx[c])
        expected = (qt.codes[:, c].float() - qt.zeros[:, g].float()) * qt.scales[:, g].float()
        assert torch.equal(w[:, c], expected)
    perm = act_order_perm(qt)
    assert torch.equal(qt.g_idx[perm].long(), torch.arange(24) // 8)  # contiguous groups after permuting


def test_qtensor_rejects_bad_fields_all_at_once():
    with pytest.raises(InputError) as e:
        QTensor(
            codes=torch.full((2, 4), 16, dtype=torch.uint8),
            scales=torch.ones(2, 3),
            bits=4,
            group_size=2,
            bias=torch.zeros(3),
        )
    msg = str(e.value)
    assert "codes" in msg and "scales" in msg and "bias" in msg
    with pytest.raises(InputError, match="bits"):
        QTensor(codes=torch.zeros(2, 4, dtype=torch.uint8), scales=torch.ones(2, 1), bits=3, group_size=-1)
    with pytest.raises(InputError, match="act_quant"):
        QTensor(
            codes=torch.zeros(2, 4, dtype=torch.uint8),
            scales=torch.ones(2, 1),
            bits=8,
            group_size=-1,
            act_quant="fp8",
        )


def test_qlinear_matches_dequantized_linear_and_round_trips():
    qt = random_qtensor(6, 32, bits=4, group_size=8, symmetric=False, act_order=True, bias=True)
    layer = QLinear.from_qtensor(qt)
    x = torch.randn(3, 5, 32)
    assert torch.allclose(layer(x), F.linear(x, dequantize(qt), qt.bias.float()), atol=1e-6)
    assert_same_qtensor(layer.qtensor, qt)
    assert layer(x.half()).dtype == torch.float16


def test_qlinear_w8a8_quantizes_activations_per_token():
    qt = with_fields(
        random_qtensor(4, 16, bits=8, group_size=-1, symmetric=True), act_quant="int8_per_token_dynamic"
    )
    x = torch.randn(7, 16)
    expected = F.linear(fake_quant_int8_per_token(x), dequantize(qt))
    assert torch.allclose(QLinear(qt)(x), expected, atol=1e-6)


def test_fake_quant_int8_per_token_error_bound():
    x = torch.randn(10, 64) * torch.logspace(-2, 2, 10)[:, None]
    step = x.abs().amax(dim=-1, keepdim=True) / 127
    assert torch.all((fake_quant_int8_per_token(x) - x).abs() <= step / 2 + 1e-6 * step)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_save_load_round_trip(tmp_path, bits, symmetric):
    qts = {
        "model.layers.0.self_attn.q_proj": random_qtensor(
            8, 33, bits, 16, symmetric, act_order=True, bias=True
        ),
        "model.layers.0.mlp.down_proj": with_fields(
            random_qtensor(5, 20, bits, -1, symmetric, seed=3), input_scale=torch.rand(20) + 0.5
        ),
    }
    if bits == 8:
        qts["w8a8"] = with_fields(
            random_qtensor(4, 8, 8, -1, True, scale_dtype=torch.float32), act_quant="int8_per_token_dynamic"
        )
    path = tmp_path / "q.safetensors"
    save_qtensors(path, qts, extra_metadata={"note": "x"})
    loaded = load_qtensors(path)
    assert loaded.keys() == qts.keys()
    for name in qts:
        assert_same_qtensor(loaded[name], qts[name])


def test_load_refuses_files_without_our_metadata(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "plain.safetensors"
    save_file({"a.qcodes": torch.zeros(2, 2, dtype=torch.uint8)}, str(path))
    with pytest.raises(InputError, match="lorafast_qform"):
        load_qtensors(path)


def test_save_accepts_qtensors_that_share_a_tensor(tmp_path):
    """q/k/v quantized against one Hessian may share one g_idx object; the file must still round-trip."""
    q = random_qtensor(8, 32, 4, 16, True, act_order=True)
    k = with_fields(random_qtensor(8, 32, 4, 16, True, seed=5), g_idx=q.g_idx)
    assert k.g_idx is q.g_idx
    save_qtensors(tmp_path / "q.safetensors", {"q": q, "k": k})
    loaded = load_qtensors(tmp_path / "q.safetensors")
    assert_same_qtensor(loaded["q"], q)
    assert_same_qtensor(loaded["k"], k)


@pytest.mark.parametrize(
    "bits,group_size,symmetric", [(4, 16, True), (4, 16, False), (8, -1, True), (4, 32, False)]
)
def test_padding_adds_weights_that_dequantize_to_zero(bits, group_size, symmetric):
    """40 columns at g16: a ragged last group of 8 (g32: 8); padded to 64 columns and 13 rows, the original block
    dequantizes exactly as before and every new entry to exactly 0, whatever its group."""
    qt = random_qtensor(9, 40, bits, group_size, symmetric, bias=True)
    qt = with_fields(qt, input_scale=torch.rand(40) + 0.5)
    p = pad_qtensor(qt, out_features=13, in_features=64)
    assert p.codes.shape == (13, 64) and p.scales.shape[1] == (1 if group_size == -1 else 64 // group_size)
    w, wp = dequantize(qt), dequantize(p)
    assert torch.equal(wp[:9, :40], w)
    assert torch.equal(wp[9:], torch.zeros(4, 64)) and torch.equal(wp[:, 40:], torch.zeros(13, 24))
    assert torch.equal(p.bias[:9], qt.bias) and not p.bias[9:].any()
    assert torch.equal(p.input_scale[:40], qt.input_scale) and torch.equal(p.input_scale[40:], torch.ones(24))
    assert pad_qtensor(qt) is not qt and torch.equal(dequantize(pad_qtensor(qt)), w)  # nothing to pad: same


def test_padding_refuses_act_order():
    with pytest.raises(InputError, match="act-order"):
        pad_qtensor(random_qtensor(4, 32, 4, 16, True, act_order=True), in_features=48)
