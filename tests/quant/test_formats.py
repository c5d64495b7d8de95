import pytest
import torch

from lorafast_export.errors import InputError
from lorafast_export.qform import (
    QScheme,
    dequantize,
    fake_quant_int8_per_token,
    group_index,
    with_fields,
    zero_points,
)
from lorafast_export.quant.formats import (
    awq_quant_config,
    compressed_tensors_config,
    ct_fake_quant_int8_per_token,
    gptq_quant_config,
    pack_awq,
    pack_compressed_tensors,
    pack_gptq,
    scheme_from_config_group,
    unpack_awq,
    unpack_compressed_tensors,
    unpack_gptq,
)
from lorafast_export.quant.formats.packing import pack_int32, unpack_int32
from tests.quant.helpers import assert_same_qtensor, random_qtensor


def u32(word) -> int:
    return int(word) & 0xFFFFFFFF


# ------------------------------------------------------------------------------ the packing primitive


def test_pack_int32_known_words():
    v = torch.arange(8).reshape(1, 8)
    assert u32(pack_int32(v, 4, dim=1)[0, 0]) == 0x76543210  # little-endian nibbles
    assert u32(pack_int32(v, 4, dim=1, order=(0, 2, 4, 6, 1, 3, 5, 7))[0, 0]) == 0x75316420  # AWQ order
    assert (
        u32(pack_int32(torch.tensor([[129, 130, 0, 0]]), 8, dim=1)[0, 0]) == 33409
    )  # compressed-tensors doc
    assert pack_int32(torch.full((1, 8), 15), 4, dim=1).item() == -1  # sign bit wraps into int32


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dim", [0, 1])
def test_pack_unpack_int32_inverse(bits, dim):
    v = torch.randint(0, 2**bits, (16, 24))
    for order in (None, tuple(torch.randperm(32 // bits).tolist())):
        packed = pack_int32(v, bits, dim=dim, order=order)
        assert packed.dtype == torch.int32
        assert torch.equal(unpack_int32(packed, bits, dim=dim, order=order), v)


# ------------------------------------------------------------------------------------------------ GPTQ


def gptq_reference_pack(qt, v1):
    """Slow transcription of the GPTQ layout: qweight row k = Σ_j code[in=k·pf+j] << bits·j, per output."""
    pf, bits = 32 // qt.bits, qt.bits
    qweight = torch.zeros(qt.in_features // pf, qt.out_features, dtype=torch.int64)
    for k in range(qweight.shape[0]):
        for j in range(pf):
            qweight[k] |= qt.codes[:, k * pf + j].long() << (bits * j)
    z = zero_points(qt).T.long() - (1 if v1 else 0)  # [G, out]; v1 stores zero - 1 (all zeros >= 1 here)
    qzeros = torch.zeros(z.shape[0], qt.out_features // pf, dtype=torch.int64)
    for col in range(qzeros.shape[1]):
        for j in range(pf):
            qzeros[:, col] |= z[:, col * pf + j] << (bits * j)
    return qweight, qzeros


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
@pytest.mark.parametrize("group_size", [16, -1])
def test_gptq_round_trip_is_bit_exact(bits, symmetric, act_order, fmt, group_size):
    qt = random_qtensor(24, 64, bits, group_size, symmetric, act_order=act_order, seed=bits, bias=True)
    tensors = pack_gptq(qt, checkpoint_format=fmt)
    assert tensors["qweight"].shape == (64 * bits // 32, 24) and tensors["qweight"].dtype == torch.int32
    assert tensors["qzeros"].shape == (qt.n_groups, 24 * bits // 32)
    assert tensors["scales"].shape == (qt.n_groups, 24) and tensors["scales"].dtype == torch.float16
    assert tensors["g_idx"].dtype == torch.int32
    back = unpack_gptq(tensors, bits, group_size, sym=symmetric, checkpoint_format=fmt)
    assert_same_qtensor(back, qt)


@pytest.mark.parametrize("v1", [True, False])
def test_gptq_layout_matches_slow_reference_and_its_dequant_formula(v1):
    qt = random_qtensor(16, 32, 4, 8, symmetric=False, act_order=True, seed=7)
    qt = with_fields(qt, zeros=qt.zeros.clamp(min=1))  # v1's zero-1 is per-nibble only without zero 0
    tensors = pack_gptq(qt, checkpoint_format="gptq" if v1 else "gptq_v2")
    ref_qweight, ref_qzeros = gptq_reference_pack(qt, v1)
    assert torch.equal(tensors["qweight"].long() & 0xFFFFFFFF, ref_qweight)
    assert torch.equal(tensors["qzeros"].long() & 0xFFFFFFFF, ref_qzeros)
    # GPTQ's own dequantization: w = scales[g_idx] * (unpacked_weight - (unpacked_zero + v1))
    iw = torch.stack([(tensors["qweight"].long() >> (4 * j)) & 0xF for j in range(8)], 1).reshape(32, 16)
    iz = torch.stack([(tensors["qzeros"].long() >> (4 * j)) & 0xF for j in range(8)], 2).reshape(-1, 16) + v1
    g = tensors["g_idx"].long()
    w = tensors["scales"].float()[g] * (iw - iz[g]).float()  # [in, out]
    assert torch.equal(w.T, dequantize(qt))


def test_gptq_v1_symmetric_zeros_are_seven():
    tensors = pack_gptq(random_qtensor(8, 16, 4, -1, symmetric=True))
    assert torch.all(tensors["qzeros"] == 0x77777777)


def test_gptq_refuses_what_it_cannot_store():
    with pytest.raises(InputError, match="in_features"):
        pack_gptq(random_qtensor(8, 12, 4, -1, True))
    with pytest.raises(InputError, match="scale_dtype"):
        pack_gptq(random_qtensor(8, 16, 4, -1, True, scale_dtype=torch.float32))
    pack_gptq(random_qtensor(8, 16, 4, -1, True, scale_dtype=torch.float32), allow_scale_rounding=True)
    with pytest.raises(InputError, match="sym=false"):
        unpack_gptq(pack_gptq(random_qtensor(8, 16, 4, -1, False)), 4, -1, sym=True)


def test_gptq_config_loads_in_transformers():
    from transformers import GPTQConfig

    cfg = gptq_quant_config(QScheme(bits=4, group_size=128, symmetric=True, act_order=True))
    assert cfg["checkpoint_format"] == "gptq" and cfg["desc_act"] is True and cfg["sym"] is True
    loaded = GPTQConfig.from_dict(cfg)
    assert (loaded.bits, loaded.group_size, loaded.desc_act, loaded.format) == (4, 128, True, "gptq")


# ------------------------------------------------------------------------------------------------- AWQ


@pytest.mark.parametrize("symmetric", [True, False])
def test_awq_round_trip_is_bit_exact(symmetric):
    qt = random_qtensor(32, 64, 4, 16, symmetric, seed=3, bias=True)
    tensors = pack_awq(qt)
    assert tensors["qweight"].shape == (64, 4) and tensors["qzeros"].shape == (4, 4)
    assert tensors["scales"].shape == (4, 32) and tensors["scales"].dtype == torch.float16
    back = unpack_awq(tensors, group_size=16)
    assert_same_qtensor(back, with_fields(qt, zeros=zero_points(qt)))  # symmetric comes back explicit
    assert torch.equal(dequantize(back), dequantize(qt))


def test_awq_layout_matches_slow_reference():
    qt = random_qtensor(16, 32, 4, 16, symmetric=False, seed=4)
    order = [0, 2, 4, 6, 1, 3, 5, 7]
    intweight = qt.codes.T.long()  # [in, out]
    ref = torch.zeros(32, 2, dtype=torch.int64)
    for col in range(2):
        for i in range(8):
            ref[:, col] |= intweight[:, col * 8 + order[i]] << (i * 4)
    assert torch.equal(pack_awq(qt)["qweight"].long() & 0xFFFFFFFF, ref)


def test_awq_refuses_8bit_act_order_and_per_channel():
    for qt in (
        random_qtensor(8, 32, 8, 16, False),
        random_qtensor(8, 32, 4, 16, False, act_order=True),
        random_qtensor(8, 32, 4, -1, False),
    ):
        with pytest.raises(InputError, match="AWQ"):
            pack_awq(qt)


def test_awq_config_loads_in_transformers():
    from transformers import AwqConfig

    cfg = awq_quant_config(QScheme(bits=4, group_size=128, symmetric=False))
    loaded = AwqConfig.from_dict(cfg)
    assert (loaded.bits, loaded.group_size, loaded.zero_point) == (4, 128, True)


# ----------------------------------------------------------------------------------- compressed-tensors


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("shape,group_size", [((24, 64), 16), ((13, 20), -1), ((5, 36), 8)])
def test_compressed_tensors_pack_quantized_round_trip(bits, symmetric, act_order, shape, group_size):
    qt = random_qtensor(*shape, bits, group_size, symmetric, act_order=act_order, seed=bits, bias=True)
    tensors = pack_compressed_tensors(qt)
    pf = 32 // bits
    out, in_ = shape
    assert (
        tensors["weight_packed"].shape == (out, -(-in_ // pf))
        and tensors["weight_packed"].dtype == torch.int32
    )
    assert tensors["weight_shape"].tolist() == [out, in_] and tensors["weight_shape"].dtype == torch.int64
    assert ("weight_zero_point" in tensors) == (not symmetric)
    if not symmetric:
        assert tensors["weight_zero_point"].shape == (-(-out // pf), qt.n_groups)
    back = unpack_compressed_tensors(tensors, qt.scheme, "pack-quantized")
    assert_same_qtensor(back, qt)


def test_compressed_tensors_layout_matches_slow_reference():
    """compressed-tensors packs signed q + 2**(bits-1) little-endian along the row, zero-padded."""
    qt = random_qtensor(3, 10, 4, -1, symmetric=False, seed=5)
    signed = qt.codes.long() - 8
    padded = torch.cat([signed + 8, torch.zeros(3, 6, dtype=torch.long)], dim=1)
    ref = torch.zeros(3, 2, dtype=torch.int64)
    for k in range(2):
        for i in range(8):
            ref[:, k] |= padded[:, k * 8 + i] << (4 * i)
    assert torch.equal(pack_compressed_tensors(qt)["weight_packed"].long() & 0xFFFFFFFF, ref)


@pytest.mark.parametrize("symmetric", [True, False])
def test_compressed_tensors_int_quantized_w8a8_round_trip(symmetric):
    qt = with_fields(
        random_qtensor(12, 40, 8, -1, symmetric, scale_dtype=torch.float32),
        act_quant="int8_per_token_dynamic",
    )
    tensors = pack_compressed_tensors(qt)
    assert tensors["weight"].dtype == torch.int8
    assert torch.equal(tensors["weight"].to(torch.int16), qt.codes.to(torch.int16) - 128)
    assert ("weight_zero_point" in tensors) == (not symmetric)
    cfg = compressed_tensors_config(qt.scheme)
    assert cfg["format"] == "int-quantized"
    scheme = scheme_from_config_group(cfg["config_groups"]["group_0"])
    assert scheme == qt.scheme
    assert_same_qtensor(unpack_compressed_tensors(tensors, scheme, cfg["format"]), qt)


def test_compressed_tensors_config_shape():
    cfg = compressed_tensors_config(QScheme(bits=4, group_size=128, symmetric=False))
    group = cfg["config_groups"]["group_0"]
    assert cfg["quant_method"] == "compressed-tensors" and cfg["format"] == "pack-quantized"
    assert cfg["ignore"] == ["lm_head"] and group["targets"] == ["Linear"]
    assert group["weights"] == {
        "num_bits": 4,
        "type": "int",
        "symmetric": False,
        "strategy": "group",
        "group_size": 128,
        "dynamic": False,
        "actorder": None,
        "block_structure": None,
    }
    assert group["input_activations"] is None
    assert scheme_from_config_group(group) == QScheme(4, 128, False)
    per_channel = compressed_tensors_config(QScheme(bits=8, group_size=-1, symmetric=True))
    assert per_channel["config_groups"]["group_0"]["weights"]["strategy"] == "channel"


def test_compressed_tensors_config_refuses_act_order():
    """0.20 removed actorder "group" (g_idx); "weight" means groups in column order, which is not our act-order."""
    with pytest.raises(InputError, match="act-order"):
        compressed_tensors_config(QScheme(bits=4, group_size=128, symmetric=True, act_order=True))
    weights = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 128}
    assert not scheme_from_config_group({"weights": {**weights, "actorder": "weight"}}).act_order
    assert scheme_from_config_group({"weights": {**weights, "actorder": "group"}}).act_order  # legacy, < 0.20


def test_compressed_tensors_config_validates_upstream_when_installed():
    ct = pytest.importorskip("compressed_tensors.quantization")
    w8a8 = QScheme(8, -1, True, act_quant="int8_per_token_dynamic")
    for scheme in (QScheme(4, 32, False), QScheme(8, -1, True), w8a8):
        ct.QuantizationConfig.model_validate(compressed_tensors_config(scheme))


def test_ct_activation_rounding_matches_compressed_tensors_when_installed():
    """What transformers runs for our W8A8 config: absmax/127.5, [-128, 127]; not our absmax/127."""
    ct = pytest.importorskip("compressed_tensors.quantization")
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import compute_dynamic_scales_and_zp

    group = compressed_tensors_config(QScheme(8, -1, True, act_quant="int8_per_token_dynamic"))[
        "config_groups"
    ]
    args = ct.QuantizationArgs.model_validate(group["group_0"]["input_activations"])
    x = torch.randn(2, 7, 48, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.1, 9, 48)
    x[0, 3] = 0.0  # an all-zero token
    scale, zp = compute_dynamic_scales_and_zp(x, args, module=None)
    theirs = fake_quantize(x, scale, zp, args)
    assert torch.equal(ct_fake_quant_int8_per_token(x), theirs)
    assert not torch.equal(fake_quant_int8_per_token(x), theirs)


def test_compressed_tensors_matches_upstream_packer_when_installed():
    pytest.importorskip("compressed_tensors")
    try:  # compressed-tensors >= 0.20 moved its packer
        import compressed_tensors.compressors.pack_quantized.helpers as pq
    except ImportError:
        pq = pytest.importorskip("compressed_tensors.compressors.quantized_compressors.pack_quantized")
    qt = random_qtensor(16, 40, 4, 8, symmetric=False, seed=9)
    signed = (qt.codes.to(torch.int16) - 8).to(torch.int8)
    assert torch.equal(pack_compressed_tensors(qt)["weight_packed"], pq.pack_to_int32(signed, 4))
    zp = (qt.zeros.to(torch.int16) - 8).to(torch.int8)
    assert torch.equal(
        pack_compressed_tensors(qt)["weight_zero_point"], pq.pack_to_int32(zp, 4, packed_dim=0)
    )


def test_group_index_default_is_contiguous():
    assert group_index(10, 4).tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2]
