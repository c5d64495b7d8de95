from pathlib import Path

import pytest
import yaml

from lorafast_export.errors import InputError
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
    r = Recipe().with_overrides({"quant.method": "gptq", "quant.bits": 4, "quant.act_order": True,
                                 "quant.calib.samples": 7, "validate.gates": ["kl_mean<=0.1"],
                                 "inputs.adapters": [{"path": "a", "weight": 0.7}, {"path": "b", "weight": 0.3}]})
    assert Recipe.from_dict(yaml.safe_load(r.to_yaml())) == r


def test_all_errors_reported_at_once_with_field_names(tmp_path):
    bad = tmp_path / "r.yaml"
    bad.write_text(yaml.safe_dump({"version": 1, "quant": {"method": "nf4", "bits": 3, "colour": "red"},
                                   "target": {"name": "tensorflow"}, "surprise": 1}))
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
    assert Recipe().with_overrides({"quant.method": "awq"}).quant.resolved()["group_size"] == 128
    assert Recipe().with_overrides({"quant.method": "int8"}).quant.resolved()["bits"] == 8


def test_bad_yaml_and_wrong_version(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("inputs: [unclosed")
    with pytest.raises(InputError, match="not valid YAML"):
        Recipe.from_yaml(p)
    p.write_text("version: 9\n")
    with pytest.raises(InputError, match="version"):
        Recipe.from_yaml(p)
