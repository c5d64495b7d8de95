"""awq-gptq against its pieces: AWQ's own scale search, folded by hand, then GPTQ on the folded layer."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from lorafast_export.model.decoder import DecoderLayer, Rotary
from lorafast_export.model.quantized import fake_quant_decoder
from lorafast_export.qform import dequantize
from lorafast_export.quant.awq import awq_search_scale
from lorafast_export.quant.blocks import LAYER_GROUPS
from lorafast_export.quant.config import resolve_quant
from lorafast_export.quant.gptq import accumulate_hessian, gptq_quantize
from lorafast_export.quant.methods import (
    RANGE_SEARCH,
    _awq_loss_fn,
    _gptq_choice,
    quantize_block_awq,
    quantize_block_awq_gptq,
    quantize_block_gptq,
)
from lorafast_export.quant.walk import quantize_checkpoint
from lorafast_export.weights import open_model
from tests.quant.helpers import make_block
from tests.quant.pipeline_helpers import mean_kl, random_ids, tiny_checkpoint

SHARED = {"bits": 4, "group_size": 32, "symmetric": False}  # every other knob at its default
AWQ = resolve_quant({"method": "awq", **SHARED})
GPTQ = resolve_quant({"method": "gptq", **SHARED})
AWQ_GPTQ = resolve_quant({"method": "awq-gptq", **SHARED})
AWQ_SCORED = dataclasses.replace(AWQ_GPTQ, scale_score="awq")  # AWQ's best scale folded, whatever GPTQ says
GPTQ_SCORED = dataclasses.replace(AWQ_GPTQ, scale_score="gptq")


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
    combined = quantize_block_awq_gptq(make_block(layer, x, rot), AWQ_SCORED)
    awq = quantize_block_awq(make_block(layer, x, rot), AWQ)
    scales = {n: qt.input_scale for n, qt in awq.items() if qt.input_scale is not None}
    assert set(scales) == {n for n, qt in combined.items() if qt.input_scale is not None}
    assert len(scales) == 7 and any(float((s - 1).abs().max()) > 0.1 for s in scales.values())
    for n, s in scales.items():  # the same search on the same inputs
        assert torch.equal(combined[n].input_scale, s), n
    same_walk = dataclasses.replace(GPTQ, true_sequential=AWQ_GPTQ.true_sequential)
    gptq = quantize_block_gptq(make_block(fold_by_hand(layer, scales), x, rot), same_walk)
    for n, qt in gptq.items():
        assert (combined[n].codes == qt.codes).float().mean() > 0.99, n  # a rare float rounding tie may flip
        torch.testing.assert_close(combined[n].scales.float(), qt.scales.float(), rtol=2e-3, atol=0)


@pytest.mark.parametrize(
    "qc",
    [
        GPTQ_SCORED,  # g32: no range search anywhere
        dataclasses.replace(GPTQ_SCORED, range_search=True),  # the search in the final solve only (default)
        dataclasses.replace(GPTQ_SCORED, range_search=True, choice_search=True),  # in the trials too
    ],
    ids=["nosearch", "search-final-only", "search-in-trials"],
)
def test_gptq_scored_scale_is_the_finalist_of_lowest_gptq_error(layer_and_input, qc):
    """scale_score gptq (the default): of the candidates, the scale under which GPTQ's output error on the group's
    calibration input is lowest, each error from gptq_quantize on one linear at a time (W·s, H scaled; the range
    search in these trial solves only with choice_search); s = 1 among them is plain GPTQ, so the choice is never
    worse than plain GPTQ by that measure."""
    layer, x, cfg = layer_and_input
    rot = Rotary(cfg)(torch.arange(x.shape[1])[None], torch.float32)
    block = make_block(layer, x, rot)
    g = LAYER_GROUPS[2]  # gate / up behind post_attention_layernorm
    xg = block.capture_inputs([g.linears[0]])[g.linears[0]]
    H, _ = accumulate_hessian(None, 0, xg)
    ws = [block.weight(n) for n in g.linears]

    def gptq_error(s):
        total = 0.0
        for w in ws:
            qt = gptq_quantize(  # the config's own GPTQ: static act-order, the range search (both defaults)
                w * s,
                H / s[:, None] / s[None, :],
                4,
                32,
                False,
                act_order=True,
                static_groups=True,
                search=RANGE_SEARCH if qc.range_search and qc.choice_search else None,
            )
            d = (dequantize(qt) / s - w).double()
            total += float(((d @ H.double()) * d).sum())
        return total

    awq_best = awq_search_scale(
        ws,
        xg,
        4,
        32,
        forward_fn=lambda w: block.sub_forward(
            "mlp", xg, dict(zip(("gate_proj.weight", "up_proj.weight"), w))
        ),
    )
    torch.manual_seed(1)
    for candidates in (
        [awq_best, torch.ones_like(awq_best)],
        [torch.rand_like(awq_best) * 4 + 0.1, awq_best, torch.ones_like(awq_best)],
    ):
        errors = [gptq_error(c) for c in candidates]
        chosen = _gptq_choice(block, qc, g, candidates, xg)
        assert torch.equal(chosen, candidates[min(range(len(errors)), key=errors.__getitem__)]), errors
        assert gptq_error(chosen) <= errors[-1]  # never worse than plain GPTQ (s = 1)


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


@pytest.mark.parametrize("group_index", [0, 2])  # attention (q, k, v), MLP (gate, up)
def test_awq_screen_forward_casts_the_input_once_with_the_same_result(layer_and_input, group_index):
    """Under the bf16 screen, the group's block gets its input cast once: exactly what autocast gives when each
    linear casts it (the attention's rotary cos / sin in bf16 too); and close to the float32 forward."""
    layer, x, cfg = layer_and_input
    rot = Rotary(cfg)(torch.arange(x.shape[1])[None], torch.float32)
    block = make_block(layer, x, rot)
    g = LAYER_GROUPS[group_index]
    xg = block.capture_inputs([g.linears[0]])[g.linears[0]]
    ws = [block.weight(n) * 1.01 for n in g.linears]
    names = [n.removeprefix(g.block + ".") + ".weight" for n in g.linears]
    full = block.sub_forward(g.block, xg, dict(zip(names, ws)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = block.sub_forward(g.block, xg, dict(zip(names, ws)), torch.bfloat16)
        got = _awq_loss_fn(block, g, xg)(ws)
        again = _awq_loss_fn(block, g, xg)(ws)
    assert got.dtype == torch.bfloat16 and torch.equal(got, expected) and torch.equal(again, expected)
    torch.testing.assert_close(got.float(), full, rtol=0.05, atol=0.05 * float(full.abs().max()))
