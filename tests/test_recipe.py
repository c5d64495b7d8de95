import dataclasses
import os
from pathlib import Path

import pytest
import yaml

from lorafast_export.errors import InputError
from lorafast_export.paths import outside_reason
from lorafast_export.quant.config import (
    AWQConfig,
    AWQGPTQConfig,
    GPTQConfig,
    Int8Config,
    RTNConfig,
    resolve_quant,
)
from lorafast_export.recipe import Recipe

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_shipped_recipes_load_validate_and_round_trip(path):
    r = Recipe.from_yaml(path)
    again = Recipe.from_dict(yaml.safe_load(r.to_yaml()))
    assert again == r
    assert again.to_yaml() == r.to_yaml()


def test_there_is_a_demo_recipe():
    assert any(p.name == "demo-hf.yaml" for p in RECIPES)


def test_round_trip_is_lossless_for_every_field():
    r = Recipe().with_overrides(
        {
            "quant.method": "gptq",
            "quant.bits": 4,
            "quant.act_order": True,
            "quant.calib.samples": 7,
            "validate.gates": ["kl_mean<=0.1"],
            "inputs.adapters": [{"path": "a", "weight": 0.7}, {"path": "b", "weight": 0.3}],
        }
    )
    assert Recipe.from_dict(yaml.safe_load(r.to_yaml())) == r


def test_all_errors_reported_at_once_with_field_names(tmp_path):
    bad = tmp_path / "r.yaml"
    bad.write_text(
        yaml.safe_dump(
            {
                "version": 1,
                "quant": {"method": "nf4", "bits": 3, "colour": "red"},
                "target": {"name": "tensorflow"},
                "surprise": 1,
            }
        )
    )
    with pytest.raises(InputError) as e:
        Recipe.from_yaml(bad)
    msg = str(e.value)
    for field in ("quant.method", "quant.bits", "quant.colour", "target.name", "surprise"):
        assert field in msg, msg
    assert "unknown key" in msg and "must be one of" in msg


def test_conflicting_options_are_refused():
    with pytest.raises(InputError, match="act_order"):
        Recipe().with_overrides({"quant.method": "awq", "quant.act_order": True})
    with pytest.raises(InputError, match="hf_format"):
        Recipe().with_overrides({"target.hf_format": "gptq"})


def test_per_method_defaults():
    awq = resolve_quant(Recipe().with_overrides({"quant.method": "awq"}).quant)
    assert isinstance(awq, AWQConfig) and (awq.bits, awq.group_size, awq.symmetric) == (4, 128, False)
    int8 = resolve_quant(Recipe().with_overrides({"quant.method": "int8"}).quant)
    assert isinstance(int8, Int8Config) and (int8.bits, int8.group_size, int8.symmetric) == (8, -1, True)
    gptq = resolve_quant({"method": "gptq", "damp_percent": 0.05, "act_order": True})
    assert (gptq.symmetric, gptq.damp_percent, gptq.act_order) == (False, 0.05, True)  # asymmetric since s7
    assert resolve_quant({"method": "gptq"}, requires_symmetric=True).symmetric is True  # trt-llm
    # a target without zero points turns an unset symmetric into True, never an explicit False
    assert resolve_quant({"method": "awq"}, requires_symmetric=True).symmetric is True
    assert resolve_quant({"method": "awq", "symmetric": False}, requires_symmetric=True).symmetric is False
    both = resolve_quant({"method": "awq-gptq", "range_search": True, "awq_grid": 10})
    assert isinstance(both, AWQGPTQConfig) and isinstance(both, GPTQConfig)  # quantize_block_gptq takes it
    assert (both.symmetric, both.range_search, both.grid, both.calibrated) == (False, True, 10, True)
    assert resolve_quant({"method": "gptq", "range_search": True}).range_search is True


@pytest.mark.parametrize("method", ["rtn", "int8", "smoothquant", "gptq", "awq", "awq-gptq"])
def test_range_search_default_is_per_method(method):
    """quant.range_search unset: the method's default (on for gptq / awq-gptq at groups of >= 128 columns), resolved
    into what is recorded and keyed; an explicit value wins; a method that searches nothing refuses true and records
    false."""
    searches = method in ("gptq", "awq-gptq")
    assert Recipe().with_overrides({"quant.method": method}).quant.range_search is None
    qc = resolve_quant({"method": method})
    assert qc.record()["range_search"] is searches and qc.source.range_search is searches
    assert getattr(qc, "range_search", False) is searches
    if searches:
        assert resolve_quant({"method": method, "range_search": False}).range_search is False
        # smaller groups and per channel: off unless asked for (it lost at g32 / g64 on the fixture)
        for gs in (32, 64, -1):
            assert resolve_quant({"method": method, "group_size": gs}).range_search is False, gs
        assert resolve_quant({"method": method, "group_size": 256}).range_search is True
        assert resolve_quant({"method": method, "group_size": 32, "range_search": True}).range_search is True
    else:
        assert resolve_quant({"method": method, "range_search": False}).record()["range_search"] is False
        with pytest.raises(InputError, match="range_search"):
            Recipe().with_overrides({"quant.method": method, "quant.range_search": True})


def test_gptq_walk_default_is_per_group_size():
    """GPTQ walks true-sequentially at groups of >= 128 columns and per channel (the default settings' CPU time),
    in one pass below (lower KL measured at g32 / g64); awq-gptq always in one pass. The walk is recorded, so an
    exported GPTQ checkpoint's quantization_config states it."""
    from lorafast_export.model.quantized import QuantizedModel
    from lorafast_export.qform import QScheme
    from lorafast_export.quant.export_hf import quantization_config

    for gs, walk in ((128, True), (256, True), (-1, True), (64, False), (32, False)):
        qc = resolve_quant({"method": "gptq", "group_size": gs})
        assert qc.true_sequential is walk and qc.record()["true_sequential"] is walk, gs
        qm = QuantizedModel(config=None, fp={}, q={}, settings=qc.record())
        assert quantization_config("gptq", QScheme(4, gs, False), qm)["true_sequential"] is walk, gs
    for gs, walk in ((128, True), (32, False)):  # awq-gptq walks as gptq does (session 10)
        assert resolve_quant({"method": "awq-gptq", "group_size": gs}).record()["true_sequential"] is walk
    # artifacts written before the walk was recorded: the method's walk of then
    old = QuantizedModel(config=None, fp={}, q={}, settings={"method": "gptq"})
    assert quantization_config("gptq", QScheme(4, 128, False), old)["true_sequential"] is True


def test_awq_gptq_choice_finalists_default_is_per_group_size():
    """awq-gptq's scale choice: GPTQ's error decides among AWQ's 10 best scales at groups of >= 128 columns, its 3
    best below and per channel (bench/QUANT.md, session 12); recorded, and part of the quantize stage's cache key."""
    for gs, n in ((128, 10), (256, 10), (64, 3), (32, 3), (-1, 3)):
        qc = resolve_quant({"method": "awq-gptq", "group_size": gs})
        assert qc.choice_finalists == n and qc.record()["choice_finalists"] == n, gs
    assert "choice_finalists" not in resolve_quant({"method": "gptq"}).record()


def test_scale_refit_default_is_resolved_and_recorded():
    """quant.scale_refit unset: on for gptq and awq-gptq, recorded resolved; off asked for, off; asked for with a
    method that has no scales to refit, an error naming the field."""
    for method in ("gptq", "awq-gptq"):
        qc = resolve_quant({"method": method})
        assert qc.scale_refit is True and qc.record()["scale_refit"] is True
        off = resolve_quant({"method": method, "scale_refit": False})
        assert off.scale_refit is False and off.record()["scale_refit"] is False
    assert resolve_quant({"method": "awq"}).record()["scale_refit"] is False
    with pytest.raises(ValueError, match="quant.scale_refit"):
        resolve_quant({"method": "rtn", "scale_refit": True})


def test_quant_configs_are_per_method_and_frozen():
    with pytest.raises(TypeError):  # a knob of another method is not a field of this one
        RTNConfig(bits=4, group_size=128, symmetric=False, grid=20)
    with pytest.raises(dataclasses.FrozenInstanceError):
        resolve_quant({"method": "rtn"}).bits = 8


def test_quant_record_keeps_the_artifact_layout():
    """What artifacts record: every recipe quant field, method defaults filled (the layout before configs)."""
    rec = resolve_quant({"method": "smoothquant", "smooth_alpha": 0.7}).record()
    assert list(rec)[:4] == ["method", "bits", "group_size", "symmetric"]
    assert rec | {"calib": None} == {
        "method": "smoothquant", "bits": 8, "group_size": -1, "symmetric": True, "act_order": False,
        "static_act_order": True, "range_search": False, "scale_refit": False, "damp_percent": 0.01, "block_size": 128, "smooth_alpha": 0.7, "awq_grid": 20,
        "awq_clip": True,
        "quantize_lm_head": False, "calib": None, "device": "auto",
    }  # fmt: skip


def test_bad_yaml_and_wrong_version(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("inputs: [unclosed")
    with pytest.raises(InputError, match="not valid YAML"):
        Recipe.from_yaml(p)
    p.write_text("version: 9\n")
    with pytest.raises(InputError, match="version"):
        Recipe.from_yaml(p)


# ------------------------------------------------------------------------------------- paths (issue #9)


@pytest.mark.parametrize(
    "rel, why",
    [
        ("/etc/passwd", "is absolute"),
        ("~/.bashrc", "is absolute"),
        ("../x.xml", "climbs out with '..'"),
        ("reports/../../x.xml", "climbs out with '..'"),
        ("reports/../x.xml", "climbs out with '..'"),  # stays inside, but a written path never needs '..'
        ("", "names the directory itself"),
        (".", "names the directory itself"),
    ],
)
def test_outside_reason_refuses_paths_that_leave_the_directory(tmp_path, rel, why):
    assert why in outside_reason(tmp_path / "out", rel)


def test_outside_reason_follows_symbolic_links(tmp_path):
    (tmp_path / "out" / "sub").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "out" / "escape").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "out" / "alias").symlink_to(tmp_path / "out" / "sub")
    assert "symbolic link" in outside_reason(tmp_path / "out", "escape/junit.xml")
    assert outside_reason(tmp_path / "out", "alias/junit.xml") is None  # a link that stays inside is harmless
    assert outside_reason(tmp_path / "out", "sub/deeper/junit.xml") is None  # need not exist yet
    assert outside_reason(tmp_path / "out", "junit.xml") is None


def _refusal(overrides: dict) -> str:
    with pytest.raises(InputError) as e:
        Recipe().with_overrides(overrides)
    return str(e.value)


def test_output_dir_may_not_hold_the_working_directory_home_or_an_input(tmp_path, monkeypatch):
    """With force a build replaces its output directory as a whole: never one that holds what must survive."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "base").mkdir(parents=True)
    force = {"output.force": True}
    for out in (".", str(tmp_path), str(tmp_path.parent)):
        msg = _refusal({"output.dir": out, **force})
        assert f"output.dir: {out!r} is or holds the working directory" in msg, msg
        assert "Choose a new directory" in msg
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert "your home directory" in _refusal({"output.dir": str(tmp_path / "home"), **force})
    msg = _refusal({"output.dir": "models", "inputs.base": "models/base", **force})
    assert "output.dir: 'models' is or holds the input inputs.base 'models/base'" in msg, msg
    msg = _refusal({"output.dir": "data", "validate.eval": [{"name": "e", "path": "data/e.txt"}], **force})
    assert "validate.eval[0].path 'data/e.txt'" in msg
    # inputs are only read: an output directory next to them, or inside one, is fine
    assert Recipe().with_overrides({"output.dir": "models/base/out", "inputs.base": "models/base", **force})
    assert Recipe().with_overrides({"output.dir": "dist/a", "inputs.base": "dist/ab", **force})
    # without force an existing output directory is refused before any work (pipeline.prepare_output)
    assert Recipe().with_overrides({"output.dir": "."})


def test_output_dir_through_a_symbolic_link_is_resolved(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "link").symlink_to(tmp_path)  # link -> the working directory itself
    assert "is or holds the working directory" in _refusal({"output.dir": "link", "output.force": True})


# ------------------------------------------------------------------------------ target limits from the recipe


def test_onnxruntime_group_size_is_refused_when_the_recipe_is_read():
    msg = _refusal({"target.name": "onnxruntime", "quant.method": "rtn", "quant.group_size": 8})
    assert "quant.group_size: 8 is not possible with target onnxruntime" in msg
    assert "multiple of 16 (32, 64, 128) or -1" in msg
    for ok in (
        {"quant.group_size": 16},
        {"quant.group_size": 128},
        {"quant.group_size": -1},
        {"quant.method": "int8"},
        {"target.name": "hf", "quant.group_size": 8},
    ):
        Recipe().with_overrides({"target.name": "onnxruntime", "quant.method": "rtn", **ok})


def test_target_options_and_dtype_are_checked_when_the_recipe_is_read():
    msg = _refusal(
        {
            "target.name": "onnxruntime",
            "target.options": {"threads": 2, "accuracy_level": 9},
            "target.dtype": "bfloat16",
        }
    )
    assert "3 problem(s)" in msg
    assert "target.options: unknown option 'threads'" in msg and "accuracy_level=9" in msg
    assert "target.dtype: 'bfloat16'" in msg and "use auto, float32 or float16" in msg
    msg = _refusal({"target.name": "openvino", "target.dtype": "bfloat16"})
    assert "target.dtype='bfloat16'" in msg and "Use dtype 'auto'" in msg
    msg = _refusal({"target.name": "onnxruntime", "quant.method": "smoothquant", "quant.symmetric": False})
    assert "quant.symmetric: False is not possible with target onnxruntime" in msg


def test_every_problem_is_reported_at_once_with_its_field(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    msg = _refusal(
        {
            "target.name": "onnxruntime",
            "quant.method": "rtn",
            "quant.group_size": 8,
            "target.options": {"colour": 1},
            "validate.dtype": "float16",
            "validate.device": "cpu",
            "output.dir": ".",
            "output.force": True,
        }
    )
    assert "command line / recipe: 4 problem(s):" in msg
    lines = [line for line in msg.splitlines() if line.startswith("  - ")]
    assert [line.split(":")[0] for line in lines] == [
        "  - validate.dtype",
        "  - output.dir",
        "  - quant.group_size",
        "  - target.options",
    ]


def test_a_target_declares_its_limits_as_data(monkeypatch):
    """The hook any target can fill (trt-llm's group sizes, symmetric codes, ...): rules see resolved defaults."""
    from lorafast_export import specs

    stub = specs.TargetSpec(
        "torch-compile",
        "lorafast_export.targets.torch_compile.target",
        requires_symmetric=True,  # its kernels take no zero points: quantizers default to symmetric for it
        recipe_rules=(
            specs.RecipeRule(
                "quant.bits",
                lambda bits, v: v["quant.method"] == "none" or bits == 8,
                "it runs int8 only; use quant.method int8",
            ),
            specs.RecipeRule(
                "quant.symmetric",
                lambda sym, v: v["quant.method"] == "none" or sym,
                "its kernels take no zero points; remove quant.symmetric: false",
            ),
        ),
        option_problems=lambda options, dtype: [
            f"target.options: {k!r} is not an option of the stub" for k in options
        ],
    )
    monkeypatch.setitem(specs.TARGET_SPECS, "torch-compile", stub)
    base = {"target.name": "torch-compile"}
    Recipe().with_overrides(base)
    msg = _refusal({**base, "quant.method": "rtn", "target.options": {"aot": True}})  # rtn: 4 bits by default
    assert "quant.bits: 4 is not possible with target torch-compile: it runs int8 only" in msg
    assert "target.options: 'aot' is not an option of the stub" in msg
    Recipe().with_overrides({**base, "quant.method": "int8"})
    # awq defaults to asymmetric codes, but for a target that requires_symmetric it quantizes symmetric
    Recipe().with_overrides({**base, "quant.method": "awq", "quant.bits": 8})
    msg = _refusal({**base, "quant.method": "awq", "quant.bits": 8, "quant.symmetric": False})
    assert (
        "quant.symmetric: False is not possible with target torch-compile: its kernels take no zero points"
        in msg
    )


@pytest.mark.parametrize(
    "junit, why",
    [
        ("/tmp/junit.xml", "is absolute"),
        ("~/junit.xml", "is absolute"),
        ("../junit.xml", "climbs out with '..'"),
        ("", "names the directory itself"),
        ("report.json", "is a name the build writes itself"),
        ("model/junit.xml", "is a name the build writes itself"),
    ],
)
def test_junit_is_a_file_inside_the_artifact(junit, why):
    msg = _refusal({"output.dir": "dist/x", "validate.junit": junit})
    assert f"validate.junit: {junit!r} {why}" in msg, msg
    assert "give a path relative to output.dir (dist/x), e.g. junit.xml" in msg


def test_junit_inside_the_artifact_is_accepted_and_links_out_are_not(tmp_path):
    for junit in ("junit.xml", "reports/junit.xml"):
        assert Recipe().with_overrides({"output.dir": str(tmp_path / "x"), "validate.junit": junit})
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "reports").symlink_to(tmp_path)  # an existing output directory, rebuilt with --force
    msg = _refusal({"output.dir": str(tmp_path / "x"), "validate.junit": "reports/junit.xml"})
    assert "leaves the directory through a symbolic link" in msg


def test_yaml_aliases_are_refused_quickly(tmp_path):
    """A "billion laughs" recipe (nested aliases) is refused at the first anchor, not expanded."""
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    p = tmp_path / "laughs.yaml"
    p.write_text("\n".join(lines) + "\nname: *a9\n")
    with pytest.raises(InputError, match="anchors and aliases .* are not allowed") as e:
        Recipe.from_yaml(p)
    assert str(p) in str(e.value) and "line 1" in str(e.value)
    p.write_text("version: 1\nmerge: &m {dtype: auto}\n")  # a harmless anchor is refused too: one rule
    with pytest.raises(InputError, match="anchors and aliases"):
        Recipe.from_yaml(p)


def test_yaml_duplicate_keys_are_refused(tmp_path):
    p = tmp_path / "dup.yaml"
    p.write_text("version: 1\nquant: {method: awq}\ntarget: {name: hf}\nquant: {method: none}\n")
    with pytest.raises(InputError, match="duplicate key 'quant'") as e:
        Recipe.from_yaml(p)
    assert "line 4" in str(e.value)
    p.write_text("version: 1\nquant: {method: awq, method: rtn}\n")
    with pytest.raises(InputError, match="duplicate key 'method'"):
        Recipe.from_yaml(p)


@pytest.mark.parametrize("kind", ["fifo", "device", "directory", "huge"])
def test_recipe_files_are_regular_and_small(tmp_path, kind):
    """A FIFO or /dev/zero would be read forever; a recipe bigger than 1 MiB is a wrong file."""
    p = tmp_path / "r.yaml"
    if kind == "fifo":
        os.mkfifo(p)
    elif kind == "device":
        p = Path("/dev/zero")
    elif kind == "directory":
        p.mkdir()
    else:
        p.write_text("# " + "x" * (2 << 20) + "\nversion: 1\n")
    expect = {"fifo": "a FIFO", "device": "a device", "directory": "a directory", "huge": "at most 1,048,576"}
    with pytest.raises(InputError, match=expect[kind]) as e:
        Recipe.from_yaml(p)
    assert str(p) in str(e.value)


def test_yaml_nesting_is_bounded(tmp_path):
    """PyYAML composes recursively: 20,000 '[' would end in a RecursionError (an internal error, exit 3)."""
    p = tmp_path / "deep.yaml"
    p.write_text("name: " + "[" * 20000 + "]" * 20000 + "\n")
    with pytest.raises(InputError, match="nested more than 32 levels deep"):
        Recipe.from_yaml(p)


def test_reading_a_recipe_imports_no_target_code():
    """The recipe checks targets through specs.py: no target module (or runtime) is imported to read one."""
    import subprocess
    import sys

    code = (
        "import sys; from lorafast_export.recipe import Recipe; "
        "Recipe().with_overrides({'target.name': 'onnxruntime', 'quant.method': 'rtn'}); "
        "print(sorted(m for m in sys.modules if m.startswith('lorafast_export.targets') or m in "
        "('onnxruntime', 'openvino', 'torch')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
