import json

import torch
import transformers
import yaml
from click.testing import CliRunner

from lorafast_export.cli import main
from tests.merge.test_merge_vs_peft import ALL, make_adapter
from tests.tiny import hf_logits, make_model, save_model


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def setup(tmp_path, **adapter_kw):
    base = make_model("llama")
    save_model(base, tmp_path / "base")
    pm = make_adapter(base, tmp_path / "ad", target_modules=ALL, **adapter_kw)
    return pm


def test_merge_command_is_exact(tmp_path):
    pm = setup(tmp_path, use_dora=True)
    r = run(
        "--quiet", "merge", "--base", tmp_path / "base", "--adapter", tmp_path / "ad", "--out", tmp_path / "m"
    )
    assert r.exit_code == 0, r.output
    ids = torch.randint(0, 96, (1, 12))
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert (hf_logits(merged, ids) - hf_logits(pm, ids)).abs().max() < 1e-4
    assert not list(tmp_path.glob(".m.partial-*"))


def test_build_hf_writes_manifest_and_model(tmp_path):
    pm = setup(tmp_path)
    out = tmp_path / "dist" / "mymodel"
    r = run(
        "--json",
        "build",
        "--base",
        tmp_path / "base",
        "--adapter",
        tmp_path / "ad",
        "--target",
        "hf",
        "--out",
        out,
        "--no-validate",
    )
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["artifact"] == str(out)
    man = json.loads((out / "manifest.json").read_text())
    assert man["recipe"]["target"]["name"] == "hf"
    assert {"load", "merge", "lower"} <= set(man["timings_s"])
    hashed = {i["path"].rsplit("/", 1)[-1] for i in man["inputs"]}
    assert {"config.json", "model.safetensors", "adapter_config.json", "adapter_model.safetensors"} <= hashed
    assert all(len(i["sha256"]) == 64 for i in man["inputs"])
    assert man["versions"]["transformers"] == transformers.__version__
    ids = torch.randint(0, 96, (1, 12))
    merged = transformers.AutoModelForCausalLM.from_pretrained(out / "model")
    assert (hf_logits(merged, ids) - hf_logits(pm, ids)).abs().max() < 1e-4
    # an existing artifact is not overwritten without --force
    r2 = run(
        "build", "--base", tmp_path / "base", "--adapter", tmp_path / "ad", "--out", out, "--no-validate"
    )
    assert r2.exit_code == 2 and "--force" in r2.output
    r3 = run(
        "-q",
        "build",
        "--base",
        tmp_path / "base",
        "--adapter",
        tmp_path / "ad",
        "--out",
        out,
        "--no-validate",
        "--force",
    )
    assert r3.exit_code == 0, r3.output


def test_dump_recipe_round_trips_flags(tmp_path):
    r = run(
        "build",
        "--recipe",
        "recipes/demo-hf.yaml",
        "--quant",
        "gptq",
        "--bits",
        "4",
        "--act-order",
        "--gate",
        "kl_mean<=0.02",
        "--dump-recipe",
    )
    assert r.exit_code == 0, r.output
    d = yaml.safe_load(r.output)
    assert d["quant"]["method"] == "gptq" and d["quant"]["act_order"] is True
    assert d["validate"]["gates"] == ["kl_mean<=0.02"] and d["name"] == "demo-hf"
    p = tmp_path / "r.yaml"
    p.write_text(r.output)
    again = run("build", "--recipe", p, "--dump-recipe")
    assert again.output == r.output
    # --range-search / --no-range-search set the field; without either it stays unset (the method's default)
    for flags, want in (([], None), (["--no-range-search"], False), (["--range-search"], True)):
        d = yaml.safe_load(run("build", "--quant", "awq-gptq", *flags, "--dump-recipe").output)
        assert d["quant"]["range_search"] is want, flags
    # likewise --scale-refit / --no-scale-refit; asked for with a method that has no refit, an error naming the field
    for flags, want in (([], None), (["--no-scale-refit"], False), (["--scale-refit"], True)):
        d = yaml.safe_load(run("build", "--quant", "gptq", *flags, "--dump-recipe").output)
        assert d["quant"]["scale_refit"] is want, flags
    bad = run("build", "--quant", "awq", "--scale-refit", "--dump-recipe")
    assert bad.exit_code != 0 and "quant.scale_refit" in bad.output


def test_inspect_adapter_and_model(tmp_path):
    setup(tmp_path, use_dora=True, r=4, lora_alpha=8)
    r = run("--json", "inspect", tmp_path / "ad")
    info = json.loads(r.stdout)
    assert info["type"] == "dora" and info["rank"] == 4 and info["alpha"] == 8
    assert set(info["target_modules"]) == set(ALL) and info["adapted_modules"] == 14
    m = json.loads(run("--json", "inspect", tmp_path / "base").stdout)
    assert m["family"] == "llama" and m["layers"] == 2


def test_doctor_lists_every_target():
    d = json.loads(run("--json", "doctor").stdout)
    names = {t["name"] for t in d["targets"]}
    assert names == {"hf", "torch-compile", "onnxruntime", "openvino", "trt-llm"}
    assert next(t for t in d["targets"] if t["name"] == "hf")["ok"] is True
