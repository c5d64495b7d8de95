"""The quantize stage end to end on tiny checkpoints: every method, the streaming walk, calibration, lm_head."""

from __future__ import annotations

import json

import pytest
import torch

from lorafast_export.errors import InputError
from lorafast_export.model.decoder import build_decoder, load_decoder
from lorafast_export.model.quantized import fake_quant_decoder, load_quantized, save_quantized
from lorafast_export.model.spec import EMBED, FINAL_NORM, LM_HEAD, linear_module_names
from lorafast_export.qform import ACT_QUANT_INT8_PER_TOKEN, dequantize, fake_quant_int8_per_token
from lorafast_export.quant.calib import load_calibration
from lorafast_export.quant.walk import METHODS, quantize_checkpoint
from lorafast_export.recipe import CalibOptions
from lorafast_export.specs import QUANT_METHODS
from lorafast_export.weights import open_model
from tests.quant.pipeline_helpers import mean_kl, random_ids, tiny_checkpoint, word_text

METHOD_SETTINGS = {
    "rtn": {"group_size": 32},
    "int8": {},
    "smoothquant": {},
    "gptq": {"group_size": 32, "act_order": True},
    "awq": {"group_size": 32},
    "awq-gptq": {"group_size": 32},
}
CALIB = random_ids(8, 16, seed=0)
HELD_OUT = random_ids(4, 16, seed=1)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant-models")
    return {
        "llama": tiny_checkpoint(root / "llama", "llama"),
        "qwen2": tiny_checkpoint(root / "qwen2", "qwen2"),
        "outliers": tiny_checkpoint(root / "outliers", "llama", outliers=True, kv_heads=4, seed=3),
        "tied": tiny_checkpoint(root / "tied", "llama", tie=True),
    }


def dequantized_decoder(qm):
    """The reference the fake-quant decoder must equal: plain weights = dequantize(QTensor), fp from qm.fp."""
    state = dict(qm.fp)
    for path, qt in qm.q.items():
        state[f"{path}.weight"] = dequantize(qt)
        if qt.bias is not None:
            state[f"{path}.bias"] = qt.bias.float()
    dec = build_decoder(qm.config, state)
    for path, qt in qm.q.items():
        if qt.act_quant == ACT_QUANT_INT8_PER_TOKEN:
            dec.get_submodule(path).register_forward_pre_hook(lambda m, a: (fake_quant_int8_per_token(a[0]),))
    return dec


def test_registry_covers_the_recipe_methods():
    assert set(METHODS) == set(QUANT_METHODS)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("method", list(METHOD_SETTINGS))
def test_every_method_end_to_end(models, family, method):
    qm = quantize_checkpoint(models[family], {"method": method, **METHOD_SETTINGS[method]}, calib_ids=CALIB)
    cfg = qm.config
    assert set(qm.q) == {n for i in range(cfg.num_layers) for n in linear_module_names(i)}
    assert {EMBED, FINAL_NORM, LM_HEAD} <= set(qm.fp)
    assert not any(
        k.endswith("_proj.weight") or k.endswith("_proj.bias") for k in qm.fp
    )  # biases live in QTensor
    if family == "qwen2":
        assert qm.q["model.layers.0.self_attn.q_proj"].bias is not None
    dec = fake_quant_decoder(qm)
    with torch.no_grad():
        got, want = dec(HELD_OUT)[0], dequantized_decoder(qm)(HELD_OUT)[0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert mean_kl(models[family], dec, HELD_OUT) < (0.05 if method in ("int8", "smoothquant") else 1.0)
    assert qm.settings["method"] == method and qm.settings["calib_tokens"] == (
        0 if method in ("rtn", "int8") else CALIB.numel()
    )


def test_gptq_and_awq_beat_rtn_on_outlier_activations(models):
    merged = models["outliers"]
    calib, held = random_ids(32, 32, seed=10), random_ids(8, 32, seed=11)
    kl = {}
    for method in ("rtn", "gptq", "awq"):
        qm = quantize_checkpoint(
            merged, {"method": method, "group_size": 32, "symmetric": False}, calib_ids=calib
        )
        kl[method] = mean_kl(merged, fake_quant_decoder(qm), held)
    assert kl["gptq"] < 0.95 * kl["rtn"], kl
    assert kl["awq"] < 0.8 * kl["rtn"], kl


@pytest.mark.parametrize("method", ["gptq", "awq", "smoothquant"])
def test_layer_inputs_come_from_the_quantized_layers_before(models, method):
    seen: dict[int, torch.Tensor] = {}
    settings = {
        "method": method,
        "device": "cpu",
        **METHOD_SETTINGS[method],
    }  # exact float32 comparison below
    qm = quantize_checkpoint(
        models["llama"], settings, calib_ids=CALIB, observe=lambda i, x: seen.__setitem__(i, x.clone())
    )
    outs = {}
    for name, dec in (("quant", fake_quant_decoder(qm)), ("fp", load_decoder(open_model(models["llama"])))):
        dec.model.layers[0].register_forward_hook(lambda m, a, out, name=name: outs.__setitem__(name, out[0]))
        with torch.no_grad():
            dec(CALIB)
    torch.testing.assert_close(seen[1], outs["quant"], atol=1e-5, rtol=1e-5)
    assert (seen[1] - outs["fp"]).abs().max() > 1e-3  # the fp model would have fed something else


def test_smoothing_scales_are_folded_into_the_previous_ops(models):
    merged = models["llama"]
    fp = open_model(merged).store
    qm = quantize_checkpoint(merged, {"method": "smoothquant"}, calib_ids=CALIB)
    p = "model.layers.0."
    assert not torch.equal(qm.fp[p + "input_layernorm.weight"], fp.get(p + "input_layernorm.weight"))
    scaled = {
        n.rsplit(".", 1)[-1] for n, qt in qm.q.items() if n.startswith(p) and qt.input_scale is not None
    }
    assert scaled == {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"}
    assert all(qt.act_quant == ACT_QUANT_INT8_PER_TOKEN for qt in qm.q.values())
    # AWQ folds v_proj → o_proj only without grouped-query attention
    gqa = quantize_checkpoint(merged, {"method": "awq", "group_size": 32, "awq_clip": False}, calib_ids=CALIB)
    mha = quantize_checkpoint(
        models["outliers"], {"method": "awq", "group_size": 32, "awq_clip": False}, calib_ids=CALIB
    )
    assert gqa.q[p + "self_attn.o_proj"].input_scale is None
    assert mha.q[p + "self_attn.o_proj"].input_scale is not None


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq"])
def test_quantize_lm_head(models, method):
    qm = quantize_checkpoint(
        models["llama"], {"method": method, "group_size": 32, "quantize_lm_head": True}, calib_ids=CALIB
    )
    assert "lm_head" in qm.q and LM_HEAD not in qm.fp and FINAL_NORM in qm.fp
    with torch.no_grad():
        torch.testing.assert_close(fake_quant_decoder(qm)(HELD_OUT)[0], dequantized_decoder(qm)(HELD_OUT)[0])


def test_tied_lm_head_is_never_untied_silently(models):
    with pytest.raises(InputError, match="untie"):
        quantize_checkpoint(models["tied"], {"method": "rtn", "quantize_lm_head": True}, calib_ids=CALIB)
    qm = quantize_checkpoint(models["tied"], {"method": "rtn"})
    assert LM_HEAD not in qm.fp and "lm_head" not in qm.q and fake_quant_decoder(qm).lm_head is None


def test_calibration_from_text_and_jsonl_files(models, tmp_path):
    txt, jsonl = tmp_path / "calib.txt", tmp_path / "calib.jsonl"
    txt.write_text(word_text(400, seed=1))
    jsonl.write_text("\n".join(json.dumps({"text": word_text(60, seed=s)}) for s in range(5)) + "\n")
    opts = CalibOptions(files=[str(txt), str(jsonl)], samples=6, seq_len=32, seed=0)
    a, b = load_calibration(models["llama"], opts), load_calibration(models["llama"], opts)
    assert a.shape == (6, 32) and torch.equal(a, b)
    assert not torch.equal(a, load_calibration(models["llama"], opts.model_copy(update={"seed": 1})))
    qm = quantize_checkpoint(
        models["llama"],
        {"method": "gptq", "group_size": 32, "calib": {"files": [str(txt)], "samples": 4, "seq_len": 32}},
    )
    assert qm.settings["calib_tokens"] == 4 * 32


def test_too_little_calibration_data_says_how_much_is_needed(models, tmp_path):
    f = tmp_path / "short.txt"
    f.write_text(word_text(100))
    with pytest.raises(InputError, match=r"need 640 tokens, but only 100 were found"):
        quantize_checkpoint(
            models["llama"], {"method": "gptq", "calib": {"files": [str(f)], "samples": 5, "seq_len": 128}}
        )


def test_data_free_methods_need_no_calibration_data(models):
    missing = {"files": ["/nonexistent/calib.txt"]}
    for method in ("rtn", "int8"):
        quantize_checkpoint(models["llama"], {"method": method, "calib": missing})
    with pytest.raises(InputError, match="not found"):
        quantize_checkpoint(models["llama"], {"method": "gptq", "calib": missing})


def test_bad_settings_fail_before_any_work(models):
    with pytest.raises(InputError, match="untie"):
        quantize_checkpoint(
            models["tied"], {"method": "gptq", "quantize_lm_head": True}, calib_ids=CALIB + 1000
        )
    with pytest.raises(InputError, match="vocab_size"):
        quantize_checkpoint(models["llama"], {"method": "gptq"}, calib_ids=CALIB + 1000)


def test_awq_searches_where_groups_are_ragged(tmp_path):
    """in_features not a multiple of group_size (like the demo's MLP 688 at g128): search and clip still run."""
    merged = tiny_checkpoint(tmp_path / "m", "llama", intermediate_size=96, kv_heads=4)  # down_proj: 64 + 32
    qm = quantize_checkpoint(merged, {"method": "awq", "group_size": 64}, calib_ids=CALIB)
    down = qm.q["model.layers.0.mlp.down_proj"]
    assert (down.in_features, down.n_groups) == (96, 2) and down.input_scale is not None
    assert all(qt.input_scale is not None for qt in qm.q.values())
    assert not any("no scale search" in n for n in qm.settings["notes"])
    rtn = quantize_checkpoint(merged, {"method": "rtn", "group_size": 64}, calib_ids=CALIB)
    with torch.no_grad():
        assert mean_kl(merged, fake_quant_decoder(qm), HELD_OUT) < mean_kl(
            merged, fake_quant_decoder(rtn), HELD_OUT
        )


def test_save_and_load_quantized_round_trip(models, tmp_path):
    qm = quantize_checkpoint(models["qwen2"], {"method": "awq", "group_size": 32}, calib_ids=CALIB)
    back = load_quantized(save_quantized(qm, tmp_path / "q"))
    assert back.config == qm.config and back.settings == json.loads(json.dumps(qm.settings))
    with torch.no_grad():
        assert torch.equal(fake_quant_decoder(back)(HELD_OUT)[0], fake_quant_decoder(qm)(HELD_OUT)[0])
    with pytest.raises(InputError, match="not a saved quantized model"):
        load_quantized(tmp_path)


def _qtensor_fields_equal(a, b) -> bool:
    fields = ("codes", "scales", "zeros", "g_idx", "bias", "input_scale")
    return all(
        (getattr(a, f) is None and getattr(b, f) is None) or torch.equal(getattr(a, f), getattr(b, f))
        for f in fields
    ) and (a.bits, a.group_size, a.act_quant) == (b.bits, b.group_size, b.act_quant)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_spilled_walk_equals_the_in_memory_walk(models, tmp_path, method):
    """out_dir writes one part per layer as the walk goes and returns a lazy view with the same contents."""
    opts = {"method": method, **METHOD_SETTINGS[method]}
    ref = quantize_checkpoint(models["llama"], opts, calib_ids=CALIB)
    lazy = quantize_checkpoint(models["llama"], opts, calib_ids=CALIB, out_dir=tmp_path / "spill")
    parts = sorted(p.name for p in (tmp_path / "spill").glob("part-*.safetensors"))
    assert len(parts) == ref.config.num_layers + 2  # embeddings, each layer, the head
    assert not isinstance(lazy.q, dict) and list(lazy.q) == list(ref.q) and sorted(lazy.fp) == sorted(ref.fp)
    assert all(_qtensor_fields_equal(lazy.q[n], ref.q[n]) for n in ref.q)
    assert all(torch.equal(lazy.fp[n], ref.fp[n]) for n in ref.fp)
    assert "model.layers.0.self_attn.q_proj" in lazy.q and "nope" not in lazy.q
    assert {k: v for k, v in lazy.settings.items() if k != "time_s"} == json.loads(
        json.dumps({k: v for k, v in ref.settings.items() if k != "time_s"})
    )


def test_load_quantized_refuses_a_part_that_is_missing(models, tmp_path):
    qm = quantize_checkpoint(models["llama"], {"method": "int8"}, out_dir=tmp_path / "q")
    assert len(qm.q) == 2 * 7
    (tmp_path / "q" / "part-00001.safetensors").unlink()
    with pytest.raises(InputError, match="part-00001.safetensors"):
        load_quantized(tmp_path / "q")


def test_q_info_of_a_lazy_model_matches_its_tensors(models, tmp_path):
    from lorafast_export.model.quantized import q_info

    opts = {"method": "gptq", "group_size": 32, "act_order": True}
    lazy = quantize_checkpoint(models["llama"], opts, calib_ids=CALIB, out_dir=tmp_path / "q")
    ref = quantize_checkpoint(models["llama"], opts, calib_ids=CALIB)
    assert q_info(lazy.q) == q_info(ref.q) == q_info(dict(lazy.q.items()))
    assert all(i.scheme.act_order and i.scheme.bits == 4 for i in q_info(lazy.q).values())


class _RecordingStore:
    """A weight store that records every read and can fail on one tensor."""

    def __init__(self, store, fail: str | None = None):
        self.store, self.fail, self.reads = store, fail, []

    def get(self, name: str) -> torch.Tensor:
        self.reads.append(name)
        if name == self.fail:
            raise InputError(f"cannot read {name}")
        return self.store.get(name)

    def dtype_of(self, name: str) -> torch.dtype:
        return self.store.dtype_of(name)


def test_read_ahead_walk_equals_the_plain_walk(models, monkeypatch):
    """The CUDA walk's read-ahead (the next layer read on a thread while this one is quantized), run on the CPU:
    the same QTensors as the plain walk, every tensor read once, and a failed read surfaces as its own error."""
    import dataclasses

    from lorafast_export.quant import walk

    opts = {"method": "gptq", **METHOD_SETTINGS["gptq"]}
    md = open_model(models["llama"])
    plain = quantize_checkpoint(
        dataclasses.replace(md, store=_RecordingStore(md.store)), opts, calib_ids=CALIB
    )
    monkeypatch.setattr(walk, "PREFETCH_DEVICES", ("cpu", "cuda"))
    store = _RecordingStore(md.store)
    ahead = quantize_checkpoint(dataclasses.replace(md, store=store), opts, calib_ids=CALIB)
    assert list(ahead.q) == list(plain.q) and all(
        _qtensor_fields_equal(ahead.q[n], plain.q[n]) for n in plain.q
    )
    assert all(torch.equal(ahead.fp[n], plain.fp[n]) for n in plain.fp)
    assert sorted(store.reads) == sorted(set(store.reads)) == sorted(md.store.keys())  # each tensor once
    failing = _RecordingStore(md.store, fail="model.layers.1.mlp.up_proj.weight")
    with pytest.raises(InputError, match="cannot read model.layers.1.mlp.up_proj.weight"):
        quantize_checkpoint(dataclasses.replace(md, store=failing), opts, calib_ids=CALIB)
