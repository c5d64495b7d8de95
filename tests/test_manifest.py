"""The one manifest reader and what the CLI's artifact commands take from it (the recipe, the target)."""

from __future__ import annotations

import pytest

from lorafast_export.errors import InputError
from lorafast_export.manifest import read_manifest, recorded_recipe, recorded_target, write_manifest
from lorafast_export.pipeline import artifact_target


def artifact(tmp_path, recipe):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "w.bin").write_bytes(b"x")
    write_manifest(tmp_path, {} if recipe is ... else {"recipe": recipe})
    return tmp_path


def test_recorded_target_and_recipe(tmp_path):
    a = artifact(tmp_path, {"target": {"name": "hf"}, "version": 1})
    man = read_manifest(a)
    assert recorded_target(man, a) == "hf"
    assert recorded_recipe(man, a) == {"target": {"name": "hf"}, "version": 1}
    assert artifact_target(a).name == "hf"  # the registry's target, ready to load sessions


@pytest.mark.parametrize(
    "recipe, says",
    [
        (..., "no recipe)"),
        ("hf", "no recipe)"),
        ({"target": "hf"}, "no recipe.target.name"),
        ({}, "target.name"),
    ],
)
def test_damaged_manifests_are_named(tmp_path, recipe, says):
    a = artifact(tmp_path, recipe)
    with pytest.raises(InputError) as e:
        artifact_target(a)
    assert str(a / "manifest.json") in str(e.value) and says in str(e.value)
