"""Hostile and careless inputs (issue 16, items 9-13, 16, 17): each is refused when the inputs are opened, with
exit 2, a message naming the file and the field or tensor, and nothing left behind.

Where the safetensors library has an opinion, it is the independent truth: a header we refuse, it refuses too.
"""

import json
import math
import shutil
import struct

import pytest
from click.testing import CliRunner
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from lorafast_export.cli import main
from tests.cli.test_bad_inputs import copy, edit_json
from tests.merge.test_merge_vs_peft import make_adapter
from tests.tiny import save_base_and_adapter


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    root = tmp_path_factory.mktemp("good")
    base = save_base_and_adapter(root, target_modules=["q_proj", "v_proj"])
    make_adapter(base, root / "dora", target_modules=["q_proj"], use_dora=True)
    return root


def invoke_build(good, tmp_path, *extra, base=None, adapter=None, validate=False, out="out"):
    """Run `build` on (a copy of) the good inputs into tmp_path/out; returns the CliRunner result."""
    argv = ["build", "--base", str(base or good / "base"), "--adapter", str(adapter or good / "ad")]
    argv += [*map(str, extra), "--out", str(tmp_path / out)] + ([] if validate else ["--no-validate"])
    return CliRunner().invoke(main, argv)


def build(good, tmp_path, *extra, base=None, adapter=None, validate=False):
    """invoke_build() of a build that must fail, after checking it left nothing behind."""
    before = sorted(p.name for p in tmp_path.iterdir())
    r = invoke_build(good, tmp_path, *extra, base=base, adapter=adapter, validate=validate)
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "nothing may be left behind"
    return r


def refused(r, *expect):
    assert r.exit_code == 2, (r.exit_code, r.output)
    assert "Traceback" not in r.output and "internal error" not in r.output, r.output
    for e in expect:
        assert e in r.output, (e, r.output)


# ------------------------------------------------------------------ safetensors headers (items 10, 11)


def rewrite_header(path, edit):
    """Replace a safetensors file's JSON header with edit(header) (data bytes unchanged)."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = edit(json.loads(raw[8 : 8 + n]))
    text = json.dumps(header).encode() if not isinstance(header, bytes) else header
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])


def first_tensor(h):
    return next(k for k in h if k != "__metadata__")


def two_tensors(h):
    names = sorted((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][0])
    return names[0], names[1]


def overlap(h):
    a, b = two_tensors(h)  # b starts inside a's bytes, and a gap opens after b
    shift = (h[a]["data_offsets"][1] - h[a]["data_offsets"][0]) // 2
    h[b]["data_offsets"] = [o - shift for o in h[b]["data_offsets"]]
    return h


def out_of_range(h):
    k = max((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][1])
    start, end = h[k][
        "data_offsets"
    ]  # the last tensor claims twice its rows: its bytes run past the file's end
    h[k]["shape"][0] *= 2
    h[k]["data_offsets"] = [start, start + 2 * (end - start)]
    return h


def dtype_lie(h):
    k = first_tensor(h)
    h[k]["dtype"] = "F16"  # same bytes, half the element size: the shape no longer fits
    return h


def shape_lie(h):
    k = "model.layers.0.mlp.down_proj.weight"  # [32, 48] stored; header says [48, 32] (same byte count)
    h[k]["shape"] = h[k]["shape"][::-1]
    return h


def entry(key, value):
    def f(h):
        h[first_tensor(h)][key] = value
        return h

    return f


HEADERS = {
    "header-is-array": (lambda h: [h], "got a JSON array"),
    "header-entry-is-number": (lambda h: {**h, first_tensor(h): 7}, "header entry is a JSON number"),
    "offsets-are-strings": (
        lambda h: entry("data_offsets", [str(o) for o in h[first_tensor(h)]["data_offsets"]])(h),
        "data_offsets",
    ),
    "shape-has-bool": (entry("shape", [True, 32]), "shape [true, 32]"),
    "unknown-dtype": (entry("dtype", "F4_E2M1"), "dtype 'F4_E2M1' is not one of"),
    "metadata-not-strings": (lambda h: {**h, "__metadata__": {"format": 1}}, "'__metadata__' must map"),
    "duplicate-tensor": (lambda h: b'{"a": 1, "a": 2}', "listed twice"),
    "overlapping-offsets": (overlap, "overlapping data_offsets"),
    "out-of-range-offsets": (out_of_range, "tensors need"),
    "dtype-lie": (dtype_lie, "The header does not describe the data"),
    "shape-lie": (shape_lie, "down_proj.weight is (48, 32), config.json implies (32, 48)"),
}


@pytest.mark.parametrize("case", list(HEADERS))
def test_lying_safetensors_header(good, tmp_path, case):
    edit, expect = HEADERS[case]
    base = copy(good, tmp_path, "base")
    st = base / "model.safetensors"
    rewrite_header(st, edit)
    refused(build(good, tmp_path, base=base), str(st) if case != "shape-lie" else str(base), expect)
    if case not in (
        "shape-lie",
        "metadata-not-strings",
    ):  # a consistent file with a wrong shape, or odd metadata
        with pytest.raises(SafetensorError):  # the safetensors library refuses the same file
            with safe_open(str(st), "pt") as f:
                [f.get_tensor(k) for k in f.keys()]


# ------------------------------------------------------------------ config.json vs tensors (items 10, 11)

CONFIGS = {
    "intermediate-size": (
        {"intermediate_size": 64},
        "mlp.gate_proj.weight is (48, 32), config.json implies (64, 32)",
    ),
    "head-dim": ({"head_dim": 16}, "self_attn.q_proj.weight is (32, 32), config.json implies (64, 32)"),
    "vocab-size": (
        {"vocab_size": 100},
        "model.embed_tokens.weight is (96, 32), config.json implies (100, 32)",
    ),
    "negative-kv-heads": (
        {"num_key_value_heads": -2},
        "num_key_value_heads must be a positive integer, got -2",
    ),
    "heads-as-string": (
        {"num_attention_heads": "4"},
        'num_attention_heads must be a positive integer, got "4"',
    ),
    "layers-as-bool": ({"num_hidden_layers": True}, "num_hidden_layers must be a positive integer, got true"),
    "eps-as-word": ({"rms_norm_eps": "tiny"}, 'rms_norm_eps must be a positive finite number, got "tiny"'),
    "tie-as-string": (
        {"tie_word_embeddings": "false"},
        'tie_word_embeddings must be true or false, got "false"',
    ),
    "rope-theta-nan": (
        {"rope_parameters": {"rope_type": "default", "rope_theta": float("nan")}},
        "rope_theta must be a positive finite number",
    ),
    "rope-scaling-list": ({"rope_scaling": [1, 2]}, "rope_scaling must be an object or null"),
}


@pytest.mark.parametrize("case", list(CONFIGS))
def test_config_against_tensors(good, tmp_path, case):
    changes, expect = CONFIGS[case]
    base = copy(good, tmp_path, "base")
    edit_json(base / "config.json", **changes)
    refused(build(good, tmp_path, base=base), str(base), expect)


def test_config_lists_every_problem_at_once(good, tmp_path):
    base = copy(good, tmp_path, "base")
    edit_json(base / "config.json", num_attention_heads="4", rms_norm_eps="tiny", mlp_bias="no")
    refused(
        build(good, tmp_path, base=base), "3 problem(s)", "num_attention_heads", "rms_norm_eps", "mlp_bias"
    )


def shard(base):
    """Split the base into two shards with an index, as save_pretrained does for large models."""
    sd = load_file(base / "model.safetensors")
    (base / "model.safetensors").unlink()
    names = sorted(sd)
    parts = {
        "model-00001-of-00002.safetensors": names[: len(names) // 2],
        "model-00002-of-00002.safetensors": names[len(names) // 2 :],
    }
    for f, ks in parts.items():
        save_file({k: sd[k] for k in ks}, base / f, metadata={"format": "pt"})
    weight_map = {k: f for f, ks in parts.items() for k in ks}
    return base / "model.safetensors.index.json", weight_map


@pytest.mark.parametrize(
    "bad, expect",
    [
        (lambda wm: {**wm, next(iter(wm)): 3}, "is 3, not a shard file name"),
        (lambda wm: {**wm, next(iter(wm)): None}, "is null, not a shard file name"),
        (lambda wm: list(wm.values()), "'weight_map' must be an object"),
    ],
    ids=["value-number", "value-null", "map-is-list"],
)
def test_shard_index_values(good, tmp_path, bad, expect):
    base = copy(good, tmp_path, "base")
    idx, wm = shard(base)
    idx.write_text(json.dumps({"metadata": {}, "weight_map": bad(wm)}))
    refused(build(good, tmp_path, base=base), str(idx), expect)


def test_sharded_base_still_builds(good, tmp_path):
    base = copy(good, tmp_path, "base")
    idx, wm = shard(base)
    idx.write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    r = invoke_build(good, tmp_path, base=base)
    assert r.exit_code == 0, r.output


# ------------------------------------------------------------------ adapter config (items 9, 11, 13)

ADAPTER_CONFIGS = {
    "alpha-nan": ({"lora_alpha": float("nan")}, "'lora_alpha' must be a positive finite number, got NaN"),
    "alpha-inf": ({"lora_alpha": float("inf")}, "got Infinity"),
    "r-float": ({"r": 4.5}, "'r' must be a positive integer, got 4.5"),
    "rank-pattern-bad-regex": (
        {"rank_pattern": {"q_proj(": 4}},
        "rank_pattern: key 'q_proj(' is not a valid regular expression",
    ),
    "alpha-pattern-nan": (
        {"alpha_pattern": {"q_proj": float("nan")}},
        "alpha_pattern['q_proj'] must be a positive finite number",
    ),
    "rank-pattern-list": ({"rank_pattern": [4]}, "'rank_pattern' must be an object"),
    "target-bad-regex": (
        {"target_modules": "(q_proj"},
        "target_modules: '(q_proj' is not a valid regular expression",
    ),
    "dora-flag-string": ({"use_dora": "yes"}, "'use_dora' must be true or false"),
    "targets-match-nothing": (
        {"target_modules": ["qkv_proj"]},
        "target_modules=['qkv_proj'] matches no module of the base",
    ),
    "regex-targets-match-nothing": ({"target_modules": r".*\.attn\.qkv"}, "matches no module of the base"),
    "targets-miss-adapted": (
        {"target_modules": ["v_proj"]},
        "has tensors for 'model.layers.0.self_attn.q_proj' (+1 more)",
    ),
}


@pytest.mark.parametrize("case", list(ADAPTER_CONFIGS))
def test_adapter_config(good, tmp_path, case):
    changes, expect = ADAPTER_CONFIGS[case]
    ad = copy(good, tmp_path, "ad")
    edit_json(ad / "adapter_config.json", **changes)
    refused(build(good, tmp_path, adapter=ad), str(ad), expect)


def test_adapter_without_lora_tensors(good, tmp_path):
    ad = copy(good, tmp_path, "ad")
    save_file({}, ad / "adapter_model.safetensors")
    refused(build(good, tmp_path, adapter=ad), str(ad), "has no LoRA tensors")


def test_regex_and_suffix_targets_still_build(good, tmp_path):
    for target in (r".*\.(q_proj|v_proj)", ["self_attn.q_proj", "v_proj"]):
        ad = copy(good, tmp_path, "ad")
        edit_json(ad / "adapter_config.json", target_modules=target)
        r = invoke_build(good, tmp_path, "--force", adapter=ad)
        assert r.exit_code == 0, (target, r.output)
        shutil.rmtree(ad)


# ------------------------------------------------------------------ NaN / Inf never published (item 9)


def test_weight_nan(good, tmp_path):
    refused(build(good, tmp_path, adapter=f"{good / 'ad'}:nan"), "adapter weight must be a finite number")


def test_weight_inf_in_recipe(good, tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text(
        f"version: 1\ninputs: {{base: {good / 'base'}, adapters: [{{path: {good / 'ad'}, weight: .inf}}]}}\n"
    )
    r = CliRunner().invoke(
        main, ["build", "--recipe", str(p), "--no-validate", "--out", str(tmp_path / "out")]
    )
    refused(r, "inputs.adapters.0.weight", "finite")


def nan_magnitude(good, tmp_path):
    ad = copy(good, tmp_path, "dora")
    sd = load_file(ad / "adapter_model.safetensors")
    key = next(k for k in sd if "lora_magnitude_vector" in k)
    sd[key][3] = float("nan")
    save_file(sd, ad / "adapter_model.safetensors", metadata={"format": "pt"})
    return ad


@pytest.mark.parametrize("quant", ["none", "rtn"])
def test_nan_dora_magnitude(good, tmp_path, quant):
    ad = nan_magnitude(good, tmp_path)
    refused(
        build(good, tmp_path, "--quant", quant, adapter=ad),
        "DoRA magnitude of model.layers.0.self_attn.q_proj contains NaN/Inf",
    )


@pytest.mark.parametrize(
    "alpha, extra, expect",
    [
        (1e300, ["--quant", "none"], "'model.layers.0.self_attn.q_proj.weight' (float32) has NaN/Inf"),
        (1e300, ["--quant", "rtn"], "'model.layers.0.self_attn.q_proj.weight' (float32) has NaN/Inf"),
        (1e7, ["--dtype", "float16"], "(float16) has NaN/Inf values"),
    ],
    ids=["huge-alpha", "huge-alpha-quantized", "fp16-overflow"],
)
def test_huge_alpha_overflows(good, tmp_path, alpha, extra, expect):
    ad = copy(good, tmp_path, "ad")
    edit_json(ad / "adapter_config.json", lora_alpha=alpha)
    refused(build(good, tmp_path, *extra, adapter=ad), expect, "lora_alpha=")
    assert not math.isinf(alpha)  # the config itself is finite: only the merge overflows


def test_quantized_outputs_are_checked():
    import torch

    from lorafast_export.errors import InputError
    from lorafast_export.quant.walk import check_finite_outputs

    check_finite_outputs({}, {"model.norm.weight": torch.ones(4)})
    with pytest.raises(InputError, match="NaN/Inf in model.layers.0.input_layernorm.weight"):
        check_finite_outputs({}, {"model.layers.0.input_layernorm.weight": torch.tensor([1.0, float("inf")])})


# ------------------------------------------------------------------ tokenizer checked at load (item 13)


def spy_stages(pipeline, monkeypatch) -> list[str]:
    """The names of the pipeline's stage functions as the build calls them, in order."""
    stages: list[str] = []
    for name in ("load", "merge", "quantize", "lower", "validate"):
        real = getattr(pipeline, f"{name}_stage")

        def spy(*a, _real=real, _name=name, **kw):
            stages.append(_name)
            return _real(*a, **kw)

        monkeypatch.setattr(pipeline, f"{name}_stage", spy)
    return stages


@pytest.mark.parametrize("how", ["missing", "damaged"])
def test_tokenizer_checked_when_inputs_open(good, tmp_path, how, monkeypatch):
    from lorafast_export import pipeline

    base = copy(good, tmp_path, "base")
    if how == "missing":
        for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            (base / f).unlink(missing_ok=True)
    else:
        (base / "tokenizer.json").write_text('{"model": {"type": "Nonsense"}}')
    stages = spy_stages(pipeline, monkeypatch)
    refused(build(good, tmp_path, base=base, validate=True), str(base), "validation needs")
    assert stages == ["load"], stages  # refused before the merge, not after the whole build


@pytest.mark.parametrize("target", ["onnxruntime", "openvino"])
def test_targets_that_ship_the_tokenizer_need_it_at_load(good, tmp_path, target, monkeypatch):
    from lorafast_export import pipeline
    from lorafast_export.targets.registry import require_available

    try:
        require_available(target)
    except Exception:
        pytest.skip(f"{target} is not installed")
    base = copy(good, tmp_path, "base")
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (base / f).unlink(missing_ok=True)
    stages = spy_stages(pipeline, monkeypatch)
    refused(build(good, tmp_path, "--target", target, base=base), str(base), f"the {target} artifact")
    assert stages == ["load"], stages  # refused before the merge, even with --no-validate


def test_no_tokenizer_is_fine_without_validation(good, tmp_path):
    base = copy(good, tmp_path, "base")
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (base / f).unlink(missing_ok=True)
    r = invoke_build(good, tmp_path, base=base)
    assert r.exit_code == 0, r.output
    r = invoke_build(good, tmp_path, "--quant", "gptq", base=base, out="o2")
    refused(r, "gptq calibration needs")


# ------------------------------------------------------------------ gates parsed when the recipe is read (item 16)

GATES = {
    "bad-threshold": (["--gate", "kl_mean<=abc"], "threshold 'abc' is not a number"),
    "unknown-metric": (["--gate", "kl_men<=0.1"], "did you mean 'kl_mean'?"),
    "stage-without-quant": (["--gate", "stage:quantized.kl_mean<=0.1"], "no stage 'quantized'"),
    "unknown-stage": (["--gate", "stage:artefact.kl_mean<=0.1"], "its stages: merged-fp32, merged-fp16"),
    "runtime-default-on-hf": (["--gate", "stage:artifact-runtime-default.top1>=0.9"], "no stage"),
    "fp16-stage-with-fp32-merge": (
        ["--dtype", "float32", "--gate", "stage:merged-fp16.top1>=0.9"],
        "no stage",
    ),
    "unknown-eval-set": (["--gate", "essay.kl_mean<=0.1"], "no eval set 'essay'; eval sets: prose, code"),
    "eval-set-not-given": (["--eval", "mine=x.txt", "--gate", "prose.top1>=0.9"], "eval sets: mine"),
    "two-bad-gates": (["--gate", "kl_mean<=", "--gate", "top1>>0.9"], "2 problem(s)"),
}


@pytest.mark.parametrize("case", list(GATES))
@pytest.mark.parametrize("mode", ["no-validate", "dump-recipe"])
def test_gates_checked_when_recipe_is_read(good, tmp_path, case, mode):
    """Refused before any input is opened: the base given here does not even exist."""
    flags, expect = GATES[case]
    extra = ["--dump-recipe"] if mode == "dump-recipe" else []
    r = build(good, tmp_path, *flags, *extra, base=tmp_path / "no-such-base")
    refused(r, "validate.gates", expect)


def test_gates_in_a_recipe_with_validation_off(good, tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text(
        f"version: 1\ninputs: {{base: {good / 'base'}, adapters: [{{path: {good / 'ad'}}}]}}\n"
        "validate: {enabled: false, gates: ['stage:quantized.kl_mean<=0.1']}\n"
    )
    r = CliRunner().invoke(main, ["build", "--recipe", str(p), "--out", str(tmp_path / "out")])
    refused(r, "no stage 'quantized'")


@pytest.mark.parametrize(
    "flags",
    [
        ["--quant", "rtn", "--gate", "stage:quantized.kl_mean<=0.1"],
        ["--gate", "prose.top1>=0.5", "--gate", "stage:merged-bf16.vs_previous.kl_mean<=1e-3"],
        ["--target", "openvino", "--gate", "stage:artifact-runtime-default.top1>=0.5"],
        ["--eval", "mine=x.txt", "--gate", "mine.kl_p99<0.5"],
    ],
)
def test_good_gates_are_accepted(good, flags):
    r = CliRunner().invoke(
        main, ["build", "--base", str(good / "base"), "--adapter", str(good / "ad"), *flags, "--dump-recipe"]
    )
    assert r.exit_code == 0, r.output


def test_possible_stages_cover_a_real_build(good, tmp_path):
    """The stage names known early are the ones validation reports (build), and re-validation has only two."""
    from lorafast_export.recipe import Recipe
    from lorafast_export.validate.gates import possible_stages

    base = tmp_path / "half"
    shutil.copytree(good / "base", base)
    sd = load_file(base / "model.safetensors")
    save_file({k: v.half() for k, v in sd.items()}, base / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "e.txt").write_text((good / "base" / "config.json").read_text() * 8)
    out = tmp_path / "out"
    args = ["--base", str(base), "--adapter", str(good / "ad"), "--quant", "rtn", "--group-size", "16"]
    args += [
        "--eval",
        f"e={tmp_path / 'e.txt'}",
        "--max-tokens",
        "200",
        "--gate",
        "kl_mean<=100",
        "--out",
        str(out),
    ]
    r = CliRunner().invoke(main, ["--json", "build", *args])
    assert r.exit_code == 0, r.output
    report = json.loads((out / "report.json").read_text())
    seen = {s["name"] for s in report["stages"]}
    recipe = Recipe.load(
        None,
        {"inputs.base": str(base), "inputs.adapters": [{"path": str(good / "ad")}], "quant.method": "rtn"},
    )
    assert seen == {"merged-fp32", "merged-fp16", "quantized", "artifact"}
    assert seen <= set(possible_stages(recipe))
    r = CliRunner().invoke(main, ["validate", "--artifact", str(out), "--gate", "stage:quantized.kl_mean<=1"])
    refused(r, "no stage 'quantized'; its stages: merged-fp32, artifact")


# ------------------------------------------------------------------ --adapter needs --base (item 17)


def test_adapter_without_base(good, tmp_path):
    r = CliRunner().invoke(main, ["build", "--adapter", str(good / "ad"), "--out", str(tmp_path / "out")])
    refused(r, "inputs.base", "give", "--base DIR", str(good / "ad"))
    assert not (tmp_path / "out").exists()


def test_recipe_adapters_without_base(good, tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text(f"version: 1\ninputs: {{adapters: [{{path: {good / 'ad'}}}]}}\n")
    r = CliRunner().invoke(main, ["build", "--recipe", str(p), "--out", str(tmp_path / "out")])
    refused(r, "inputs.base: the base model is required")
    p.write_text(
        "version: 1\noutput: {dir: x}\n"
    )  # a recipe without inputs, and --adapter on the command line
    r = CliRunner().invoke(
        main, ["build", "--recipe", str(p), "--adapter", str(good / "ad"), "--dump-recipe"]
    )
    refused(r, "--base DIR")


def test_base_from_recipe_and_demo_adapters_are_fine(good, tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text(f"version: 1\ninputs: {{base: {good / 'base'}}}\n")
    r = CliRunner().invoke(
        main, ["build", "--recipe", str(p), "--adapter", str(good / "ad"), "--dump-recipe"]
    )
    assert r.exit_code == 0 and f"base: {good / 'base'}" in r.output, r.output
    r = CliRunner().invoke(main, ["build", "--adapter", "demo:dora", "--dump-recipe"])
    assert r.exit_code == 0 and "base: demo:base" in r.output, r.output


# ------------------------------------------------------------------ found by the probe (tests/HOSTILE.md)


def test_deeply_nested_json(good, tmp_path):
    base = copy(good, tmp_path, "base")
    (base / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    refused(build(good, tmp_path, base=base), str(base / "config.json"), "not valid JSON")
    base2 = tmp_path / "base2"
    shutil.copytree(good / "base", base2)
    rewrite_header(base2 / "model.safetensors", lambda h: b"[" * 50_000 + b"]" * 50_000)
    refused(build(good, tmp_path, base=base2), "corrupt safetensors header (not JSON)")


def test_layer_count_far_beyond_the_tensors(good, tmp_path):
    base = copy(good, tmp_path, "base")
    edit_json(base / "config.json", num_hidden_layers=10**9)
    refused(
        build(good, tmp_path, base=base), "num_hidden_layers=1000000000, but the checkpoint has 2 layer(s)"
    )


def test_same_tensor_in_two_shards(good, tmp_path):
    base = copy(good, tmp_path, "base")
    idx, wm = shard(base)
    idx.write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    first = base / "model-00001-of-00002.safetensors"
    stale = load_file(first) | {
        "model.norm.weight": load_file(base / "model-00002-of-00002.safetensors")["model.norm.weight"]
    }
    save_file(stale, first, metadata={"format": "pt"})
    refused(build(good, tmp_path, base=base), "tensor 'model.norm.weight' is also in")


def test_eval_set_is_a_directory(good, tmp_path):
    (tmp_path / "evaldir").mkdir()
    r = build(good, tmp_path, "--eval", f"e={tmp_path / 'evaldir'}", validate=True)
    refused(r, str(tmp_path / "evaldir"), "not a regular file")


def test_report_diff_of_a_binary_file(good, tmp_path):
    (tmp_path / "a.json").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe" * 10)
    (tmp_path / "b.json").write_text("[" * 100_000)
    for a, expect in (("a.json", "not UTF-8"), ("b.json", "not valid JSON")):
        r = CliRunner().invoke(main, ["report", "diff", str(tmp_path / a), str(tmp_path / a)])
        refused(r, str(tmp_path / a), expect)
