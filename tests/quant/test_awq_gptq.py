"""awq-gptq against its pieces: AWQ's own scale search, folded by hand, then GPTQ on the folded layer."""

from __future__ import annotations

import copy

import pytest
import torch

from lorafast_export.model.decoder import DecoderLayer, Rotary, causal_mask
from lorafast_export.model.quantized import fake_quant_decoder
from lorafast_export.quant.blocks import LAYER_GROUPS, Block
from lorafast_export.quant.config import resolve_quant
from lorafast_export.quant.methods import quantize_block_awq, quantize_block_awq_gptq, quantize_block_gptq
from lorafast_export.quant.walk import quantize_checkpoint
from lorafast_export.weights import open_model
from tests.quant.pipeline_helpers import mean_kl, random_ids, tiny_checkpoint

SHARED = {"bits": 4, "group_size": 32, "symmetric": False}  # every other knob at its default
AWQ = resolve_quant({"method": "awq", **SHARED})
GPTQ = resolve_quant({"method": "gptq", **SHARED})
AWQ_GPTQ = resolve_quant({"method": "awq-gptq", **SHARED})


@pytest.fixture(scope="module")
def layer_and_input(tmp_path_factory):
    cfg = open_model(tiny_checkpoint(tmp_path_factory.mktemp("ag") / "m", "llama", kv_heads=4)).config
    torch.manual_seed(0)
    layer = DecoderLayer(cfg).eval().requires_grad_(False)
    with torch.no_grad():  # trained-looking: a few loud norm channels, so AWQ's scales are not all 1
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            norm.weight[:4] *= 10
    x = torch.randn(8, 16, cfg.hidden_size)
    return layer, x, cfg


def make_block(layer: DecoderLayer, x: torch.Tensor, cfg_rotary) -> Block:
    cos, sin = cfg_rotary
    mask = causal_mask(x.shape[1], 0, "cpu")
    return Block(
        copy.deepcopy(layer),
        LAYER_GROUPS,
        x,
        lambda m, xc: m(xc, cos, sin, mask)[0],
        sub_args={"self_attn": (cos, sin, mask, None)},
        chunk=4,
    )


def fold_by_hand(layer: DecoderLayer, scales: dict[str, torch.Tensor]) -> DecoderLayer:
    """y = W x = (W diag(s)) (x / s): the op before each group divided by s, the group's columns times s."""
    layer = copy.deepcopy(layer)
    folds = {
        "input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        "self_attn.v_proj": ("self_attn.o_proj",),
        "post_attention_layernorm": ("mlp.gate_proj", "mlp.up_proj"),
        "mlp.up_proj": ("mlp.down_proj",),
    }
    with torch.no_grad():
        for prev, linears in folds.items():
            if linears[0] not in scales:
                continue
            s = scales[linears[0]]
            w = layer.get_submodule(prev).weight
            w.copy_(w / (s if w.dim() == 1 else s[:, None]))
            for name in linears:
                layer.get_submodule(name).weight.mul_(s[None, :])
    return layer


def test_awq_gptq_is_awq_scales_then_gptq_on_the_folded_layer(layer_and_input):
    layer, x, cfg = layer_and_input
    rot = Rotary(cfg)(torch.arange(x.shape[1])[None], torch.float32)
    combined = quantize_block_awq_gptq(make_block(layer, x, rot), AWQ_GPTQ)
    awq = quantize_block_awq(make_block(layer, x, rot), AWQ)
    scales = {n: qt.input_scale for n, qt in awq.items() if qt.input_scale is not None}
    assert set(scales) == {n for n, qt in combined.items() if qt.input_scale is not None}
    assert len(scales) == 7 and any(float((s - 1).abs().max()) > 0.1 for s in scales.values())
    for n, s in scales.items():  # the same search on the same inputs
        assert torch.equal(combined[n].input_scale, s), n
    gptq = quantize_block_gptq(make_block(fold_by_hand(layer, scales), x, rot), GPTQ)
    for n, qt in gptq.items():
        assert (combined[n].codes == qt.codes).float().mean() > 0.99, n  # a rare float rounding tie may flip
        torch.testing.assert_close(combined[n].scales.float(), qt.scales.float(), rtol=2e-3, atol=0)


def test_awq_gptq_end_to_end_beats_rtn_and_records_the_folded_scales(tmp_path):
    merged = tiny_checkpoint(tmp_path / "outliers", "llama", outliers=True, kv_heads=4, seed=3)
    calib, held = random_ids(32, 32, seed=10), random_ids(8, 32, seed=11)
    kl = {}
    for method in ("rtn", "awq-gptq"):
        qm = quantize_checkpoint(
            merged, {"method": method, "group_size": 32, "symmetric": False}, calib_ids=calib
        )
        kl[method] = mean_kl(merged, fake_quant_decoder(qm), held)
    assert qm.settings["method"] == "awq-gptq"
    assert qm.q["model.layers.0.mlp.gate_proj"].input_scale is not None
    assert kl["awq-gptq"] < 0.7 * kl["rtn"], kl
