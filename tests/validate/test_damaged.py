"""Deliberately damaged candidates fail the default gates, and the report blames the stage that broke them."""

import dataclasses

import pytest
import torch

from lorafast_export.adapters import open_adapter
from lorafast_export.merge import merged_state, plan_merge
from lorafast_export.model.decoder import build_decoder
from lorafast_export.recipe import Recipe
from lorafast_export.report.attribution import error_entry
from lorafast_export.validate.candidates import decoder_candidate
from lorafast_export.validate.run import ValidationInputs, run_validation
from lorafast_export.weights import open_model
from tests.merge.test_merge_vs_peft import ALL
from tests.tiny import save_base_and_adapter, write_text


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dmg")
    save_base_and_adapter(root, {"layers": 2}, target_modules=ALL)
    write_text(root / "e.txt", n_chars=3000)
    (root / "p.txt").write_text("the model\n")
    bm, ad = open_model(root / "base"), open_adapter(str(root / "ad"))
    plan = plan_merge(bm, [ad])
    return root, bm, ad, plan, merged_state(plan, torch.float32)


def run(setup, damaged_name, damaged_decoder, tmp_path):
    root, bm, ad, plan, state = setup
    recipe = Recipe().with_overrides(
        {
            "validate.eval": [{"name": "e", "path": str(root / "e.txt")}],
            "validate.max_tokens": 400,
            "validate.prompts": str(root / "p.txt"),
            "validate.max_new_tokens": 8,
        }
    )
    good = decoder_candidate("merged-fp32", build_decoder(bm.config, state))
    cands = [
        good,
        decoder_candidate(damaged_name, damaged_decoder),
        decoder_candidate("artifact", damaged_decoder),
    ]
    v = ValidationInputs(bm, [ad], recipe, cands, "dmg", "hf", "none")
    return run_validation(v, tmp_path)


def test_perturbed_layer_fails_and_is_blamed(setup, tmp_path):
    _, bm, _, _, state = setup
    bad = dict(state)
    w = bad["model.layers.1.mlp.down_proj.weight"]
    bad["model.layers.1.mlp.down_proj.weight"] = w + 0.5 * torch.randn_like(w)
    rep = run(setup, "quantized", build_decoder(bm.config, bad), tmp_path)
    assert rep.passed is False
    assert error_entry(rep).stage == "quantized"


def test_dropped_adapter_has_gain_near_zero(setup, tmp_path):
    _, bm, _, _, _ = setup
    base_state = {k: bm.store.get(k) for k in bm.store.keys()}
    rep = run(setup, "quantized", build_decoder(bm.config, base_state), tmp_path)
    assert rep.passed is False
    assert abs(rep.adapter_gain_retained["artifact"]["e"]) < 0.02
    assert rep.adapter_gain_retained["merged-fp32"]["e"] == pytest.approx(1.0, abs=1e-4)
    assert error_entry(rep).stage == "quantized"
    failed = {g.metric for g in rep.gates if g.passed is False}
    assert "adapter_gain_retained" in failed


def test_wrong_rope_fails_and_is_blamed(setup, tmp_path):
    _, bm, _, _, state = setup
    cfg = dataclasses.replace(bm.config, rope=dataclasses.replace(bm.config.rope, theta=50.0))
    rep = run(setup, "quantized", build_decoder(cfg, state), tmp_path)
    assert rep.passed is False
    assert error_entry(rep).stage == "quantized"
