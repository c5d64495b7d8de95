"""Bad inputs: exit code 2, a message naming the file/tensor/field and the fix, no traceback, no output left."""

import json
import shutil
import struct

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from lorafast_export.cli import main
from tests.merge.test_merge_vs_peft import make_adapter
from tests.tiny import make_model, save_base_and_adapter


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    root = tmp_path_factory.mktemp("good")
    base = save_base_and_adapter(root, target_modules=["q_proj", "v_proj"])
    make_adapter(base, root / "dora", target_modules=["q_proj"], use_dora=True)
    other = make_model("llama", hidden=48, vocab=80)
    make_adapter(other, root / "other", target_modules=["q_proj"])
    make_adapter(other, root / "other_emb", target_modules=["embed_tokens"])
    return root


def copy(good, tmp_path, name):
    shutil.copytree(good / name, tmp_path / name)
    return tmp_path / name


def edit_json(path, **changes):
    d = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            d.pop(k, None)
        else:
            d[k] = v
    path.write_text(json.dumps(d))


def corrupt(kind):
    def f(good, tmp_path):
        base = copy(good, tmp_path, "base")
        st = base / "model.safetensors"
        data = st.read_bytes()
        if kind == "empty":
            st.write_bytes(b"")
        elif kind == "truncated":
            st.write_bytes(data[: len(data) // 2])
        elif kind == "header":
            st.write_bytes(struct.pack("<Q", 10**12) + data[8:])
        elif kind == "garbage-json":
            n = struct.unpack("<Q", data[:8])[0]
            st.write_bytes(data[:8] + b"{" * n + data[8 + n :])
        return ["--base", base, "--adapter", good / "ad"]

    return f


def missing_file(name):
    def f(good, tmp_path):
        base = copy(good, tmp_path, "base")
        (base / name).unlink()
        return ["--base", base, "--adapter", good / "ad"]

    return f


def config_edit(**changes):
    def f(good, tmp_path):
        base = copy(good, tmp_path, "base")
        edit_json(base / "config.json", **changes)
        return ["--base", base, "--adapter", good / "ad"]

    return f


def adapter_config_edit(**changes):
    def f(good, tmp_path):
        ad = copy(good, tmp_path, "ad")
        edit_json(ad / "adapter_config.json", **changes)
        return ["--base", good / "base", "--adapter", ad]

    return f


def nan_in(which):
    def f(good, tmp_path):
        d = copy(good, tmp_path, which)
        fname = "model.safetensors" if which == "base" else "adapter_model.safetensors"
        sd = load_file(d / fname)
        key = next(k for k in sd if ("q_proj" in k and ("lora_A" in k or which == "base")))
        sd[key][0, 0] = float("nan")
        save_file(sd, d / fname, metadata={"format": "pt"})
        return [
            "--base",
            d if which == "base" else good / "base",
            "--adapter",
            d if which == "ad" else good / "ad",
        ]

    return f


def pickle_base(good, tmp_path):
    base = copy(good, tmp_path, "base")
    sd = load_file(base / "model.safetensors")
    (base / "model.safetensors").unlink()
    torch.save(sd, base / "pytorch_model.bin")
    return ["--base", base, "--adapter", good / "ad"]


def config_not_json(good, tmp_path):
    base = copy(good, tmp_path, "base")
    (base / "config.json").write_text("{not json")
    return ["--base", base, "--adapter", good / "ad"]


def missing_tensor(good, tmp_path):
    base = copy(good, tmp_path, "base")
    sd = load_file(base / "model.safetensors")
    del sd["model.layers.1.mlp.down_proj.weight"]
    save_file(sd, base / "model.safetensors", metadata={"format": "pt"})
    return ["--base", base, "--adapter", good / "ad"]


def adapter_module_renamed(good, tmp_path):
    ad = copy(good, tmp_path, "ad")
    sd = load_file(ad / "adapter_model.safetensors")
    sd = {k.replace("q_proj", "qkv_proj"): v for k, v in sd.items()}
    save_file(sd, ad / "adapter_model.safetensors")
    return ["--base", good / "base", "--adapter", ad]


def half_lora(good, tmp_path):
    ad = copy(good, tmp_path, "ad")
    sd = load_file(ad / "adapter_model.safetensors")
    sd = {k: v for k, v in sd.items() if "layers.0.self_attn.q_proj.lora_B" not in k}
    save_file(sd, ad / "adapter_model.safetensors")
    return ["--base", good / "base", "--adapter", ad]


def recipe_file(text):
    def f(good, tmp_path):
        p = tmp_path / "r.yaml"
        p.write_text(text.replace("BASE", str(good / "base")).replace("AD", str(good / "ad")))
        return ["--recipe", p]

    return f


def flags(*extra):
    def f(good, tmp_path):
        return ["--base", good / "base", "--adapter", good / "ad", *extra]

    return f


def out_exists(good, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("user data")
    return ["--base", good / "base", "--adapter", good / "ad"]


def force_on_a_non_artifact(good, tmp_path):
    """--force replaces artifacts only: a directory of the user's without a manifest.json is never deleted."""
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("user data")
    return ["--base", good / "base", "--adapter", good / "ad", "--force"]


def out_parent_is_file(good, tmp_path):
    (tmp_path / "afile").write_text("x")
    return ["--base", good / "base", "--adapter", good / "ad", "--out", tmp_path / "afile" / "sub" / "x"]


def out_holds_input(good, tmp_path):
    """--out --force on the directory holding the base model: the build would replace (delete) the inputs."""
    base = shutil.copytree(good / "base", tmp_path / "models" / "base")
    return ["--base", base, "--adapter", good / "ad", "--out", tmp_path / "models", "--force"]


def recipe_out_is_input(good, tmp_path):
    ad = shutil.copytree(good / "ad", tmp_path / "ad")
    p = tmp_path / "r.yaml"
    p.write_text(
        f"version: 1\ninputs: {{base: {good / 'base'}, adapters: [{{path: {ad}}}]}}\n"
        f"output: {{dir: {ad}, force: true}}\n"
    )
    return [
        "--recipe",
        p,
        "--out",
        ad,
    ]  # the flag repeats the recipe's dir (the harness adds --out otherwise)


def eval_file(content: bytes, name="e.txt"):
    def f(good, tmp_path):
        (tmp_path / name).write_bytes(content)
        return [
            "--base",
            good / "base",
            "--adapter",
            good / "ad",
            "--eval",
            f"e={tmp_path / name}",
            "VALIDATE",
        ]

    return f


def runtime_missing(good, tmp_path):
    from lorafast_export.targets import registry

    class Missing:
        name, install_hint = "openvino", "pip install 'lorafast-export[openvino]'"

        def available(self):
            return False, f"openvino is not installed; {self.install_hint}"

    registry.TARGETS["openvino"] = Missing()
    return ["--base", good / "base", "--adapter", good / "ad", "--target", "openvino"]


CASES = {
    "base-dir-missing": (
        lambda g, t: ["--base", t / "nope", "--adapter", g / "ad"],
        "base model directory not found",
    ),
    "adapter-dir-missing": (
        lambda g, t: ["--base", g / "base", "--adapter", t / "nope"],
        "adapter directory not found",
    ),
    "config-missing": (missing_file("config.json"), "config.json: not found"),
    "config-not-json": (config_not_json, "not valid JSON"),
    "config-lacks-fields": (config_edit(hidden_size=None), "hidden_size"),
    "config-unsupported-arch": (
        config_edit(model_type="gpt2", architectures=["GPT2LMHeadModel"]),
        "Supported families",
    ),
    "config-dynamic-rope": (
        config_edit(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}),
        "rope type",
    ),
    "weights-missing": (missing_file("model.safetensors"), "no model weights found"),
    "safetensors-empty": (corrupt("empty"), "file is empty"),
    "safetensors-truncated": (corrupt("truncated"), "truncated"),
    "safetensors-bad-header-size": (corrupt("header"), "corrupt safetensors header"),
    "safetensors-header-not-json": (corrupt("garbage-json"), "corrupt safetensors header"),
    "tensor-missing": (missing_tensor, "model.layers.1.mlp.down_proj.weight"),
    "nan-in-base": (nan_in("base"), "NaN/Inf"),
    "nan-in-adapter": (nan_in("ad"), "NaN/Inf"),
    "pickle-refused": (pickle_base, "--allow-pickle"),
    "adapter-config-missing": (
        missing_file_adapter := (
            lambda g, t: (
                shutil.copytree(g / "ad", t / "ad"),
                (t / "ad" / "adapter_config.json").unlink(),
                ["--base", g / "base", "--adapter", t / "ad"],
            )[-1]
        ),
        "no adapter_config.json",
    ),
    "peft-type-loha": (adapter_config_edit(peft_type="LOHA"), "LoHa"),
    "peft-type-ia3": (adapter_config_edit(peft_type="IA3"), "not supported"),
    "adapter-bad-alpha": (adapter_config_edit(lora_alpha="big"), "lora_alpha"),
    "adapter-rank-mismatch": (adapter_config_edit(r=7), "r=7"),
    "adapter-other-model-shapes": (
        lambda g, t: ["--base", g / "base", "--adapter", g / "other"],
        "lora_A is",
    ),
    "adapter-other-vocab": (lambda g, t: ["--base", g / "base", "--adapter", g / "other_emb"], "vocab"),
    "adapter-module-missing": (adapter_module_renamed, "qkv_proj"),
    "adapter-half-lora": (half_lora, "only one of lora_A/lora_B"),
    "recipe-unknown-key": (recipe_file("version: 1\ncolour: red\n"), "colour: unknown key"),
    "recipe-wrong-type": (recipe_file("version: 1\nquant: {method: gptq, bits: many}\n"), "quant.bits"),
    "recipe-unknown-target": (recipe_file("version: 1\ntarget: {name: tflite}\n"), "target.name"),
    "recipe-unknown-method": (recipe_file("version: 1\nquant: {method: nf4}\n"), "quant.method"),
    "recipe-conflict": (recipe_file("version: 1\nquant: {method: awq, act_order: true}\n"), "act_order"),
    "recipe-missing-file": (lambda g, t: ["--recipe", t / "missing.yaml"], "recipe file not found"),
    "flag-bad-bits": (flags("--bits", "3"), "bits must be 4 or 8"),
    "flag-unknown-target": (flags("--target", "tflite"), "'tflite' is not one of"),
    "out-exists": (out_exists, "already exists"),
    "force-on-a-non-artifact": (force_on_a_non_artifact, "is not a lorafast-export artifact"),
    "out-parent-is-file": (out_parent_is_file, "cannot create the output's parent directory"),
    "dora-weighted-unsupported-type": (adapter_config_edit(use_qalora=True), "QA-LoRA"),
    "eval-empty": (eval_file(b"  \n"), "eval file is empty"),
    "eval-not-utf8": (eval_file(b"caf\xe9 \xff\xfe"), "not UTF-8"),
    "eval-too-short": (eval_file(b"tiny"), "fewer than one block"),
    "eval-jsonl-no-text": (eval_file(b'{"body": "x"}\n', "e.jsonl"), "'text' field"),
    "eval-missing": (
        lambda g, t: ["--base", g / "base", "--adapter", g / "ad", "--eval", f"e={t / 'no.txt'}", "VALIDATE"],
        "eval file not found",
    ),
    "runtime-not-installed": (runtime_missing, "pip install 'lorafast-export[openvino]'"),
    # issue #9: what the build writes stays inside the output directory, which never holds an input
    "out-holds-an-input": (out_holds_input, "holds the input inputs.base"),
    "recipe-out-is-an-input": (recipe_out_is_input, "is or holds the input inputs.adapters[0].path"),
    "junit-absolute": (flags("--junit", "/tmp/junit.xml"), "validate.junit: '/tmp/junit.xml' is absolute"),
    "junit-climbs-out": (flags("--junit", "../junit.xml"), "give a path relative to output.dir"),
    "recipe-junit-climbs-out": (
        recipe_file(
            "version: 1\ninputs: {base: BASE, adapters: [{path: AD}]}\n"
            "validate: {junit: reports/../../junit.xml}\n"
        ),
        "validate.junit: 'reports/../../junit.xml' climbs out with '..'",
    ),
    "junit-overwrites-the-manifest": (flags("--junit", "manifest.json"), "is a name the build writes itself"),
    "matrix-value-is-a-path": (flags("--matrix", "target=../../x"), "target values are plain names"),
    "matrix-value-not-an-int": (flags("--matrix", "group_size=big"), "group_size values are integers"),
    # issue 16 #19: one artifact twice, the second into the first's directory
    "matrix-value-twice": (flags("--matrix", "quant=none,none"), "'none' given twice; list each value once"),
    "matrix-int-value-twice": (flags("--matrix", "bits=4,04"), "'4' and '04' (the same value) given twice"),
    "matrix-axis-twice": (flags("--matrix", "quant=none", "quant=rtn"), "axis 'quant' is given twice"),
    "matrix-names-clash": (
        flags("--matrix", "target=torch-compile,torch", "hf_format=compressed,compile-compressed"),
        "would share the artifact directory",
    ),
    # target limits the recipe shows are refused before any work, with the fix
    "recipe-ort-group-size": (
        recipe_file(
            "version: 1\ninputs: {base: BASE, adapters: [{path: AD}]}\n"
            "quant: {method: rtn, group_size: 8}\ntarget: {name: onnxruntime}\n"
        ),
        "quant.group_size: 8 is not possible with target onnxruntime",
    ),
    "flag-ort-group-size": (
        flags("--target", "onnxruntime", "--quant", "awq", "--group-size", "8"),
        "multiple of 16 (32, 64, 128) or -1",
    ),
    "flag-ort-unknown-option": (
        flags("--target", "onnxruntime", "--target-option", "threads=2"),
        "target.options: unknown option 'threads'",
    ),
    "recipe-openvino-dtype": (
        recipe_file(
            "version: 1\ninputs: {base: BASE, adapters: [{path: AD}]}\n"
            "target: {name: openvino, dtype: bfloat16}\n"
        ),
        "target.dtype='bfloat16'",
    ),
    "matrix-combination-ort-group-size": (
        flags("--quant", "rtn", "--group-size", "8", "--matrix", "target=hf,onnxruntime"),
        "onnxruntime: command line / recipe: 1 problem(s):\n  - quant.group_size",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(good, tmp_path, case):
    from lorafast_export.targets import registry

    make_args, expect = CASES[case]
    saved = registry.TARGETS.get("openvino")  # before make_args: one case replaces it with a missing runtime
    args = make_args(good, tmp_path)
    out = tmp_path / "out"
    validate = "VALIDATE" in args
    args = [a for a in args if a != "VALIDATE"]
    argv = ["build", *map(str, args)] + ([] if validate else ["--no-validate"])
    if "--out" not in argv:
        argv += ["--out", str(out)]
    before = sorted(p.name for p in tmp_path.iterdir())
    try:
        r = CliRunner().invoke(main, argv)
    finally:
        registry.TARGETS.pop("openvino", None)
        if saved is not None:
            registry.TARGETS["openvino"] = saved
    assert r.exit_code == 2, (r.exit_code, r.output)
    assert expect in r.output, r.output
    assert "Traceback" not in r.output
    after = sorted(p.name for p in tmp_path.iterdir())
    assert after == before, "nothing may be left behind (and nothing of the user's removed)"
    if case in ("out-exists", "force-on-a-non-artifact"):
        assert (out / "keep.txt").read_text() == "user data"
    kept = {
        "out-holds-an-input": "models/base/config.json",
        "recipe-out-is-an-input": "ad/adapter_config.json",
    }
    if case in kept:  # the inputs inside the refused output directory are untouched
        assert (tmp_path / kept[case]).is_file()
