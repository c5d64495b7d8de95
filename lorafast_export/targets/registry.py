"""Target implementations, registered by name. What a target is and declares (its name, the module that
implements it, its limits) is data in specs.py; this module imports the implementation, lazily, when a build,
`doctor` or `verify` needs it (heavy runtimes load only when used). Each targets/<package>/target.py calls
`register` for its target object (name, install_hint, available(), lower(), load()).
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from lorafast_export.errors import InputError, RuntimeMissingError
from lorafast_export.paths import outside_reason
from lorafast_export.specs import TARGET_NAMES, target_spec

TARGETS: dict[str, Target] = {}


@dataclass
class LowerInput:
    """What every target receives: the merged checkpoint, and the quantized form when a method ran."""

    merged_dir: Path  # HF checkpoint of the merged model (config.json, safetensors, tokenizer)
    config: Any  # lorafast_export.model.spec.ModelConfig
    recipe: Any  # lorafast_export.recipe.Recipe
    quantized: Any = None  # lorafast_export.model.quantized.QuantizedModel, or None


class Session(Protocol):
    """A loaded artifact, as validation and bench use it."""

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor: ...  # [b, s] → [b, s, V] fp32

    def generate(self, input_ids: list[int], max_new_tokens: int) -> list[int]: ...  # greedy, new tokens only


class Target(Protocol):
    name: str
    install_hint: str
    # what it declares as data (limits, recorded paths) is its specs.TargetSpec

    def available(self) -> tuple[bool, str]: ...

    def lower(
        self, inp: LowerInput, out_dir: Path
    ) -> dict: ...  # writes model/ ; returns facts for the manifest

    def load(self, model_dir: Path, device: str = "cpu") -> Session: ...


def register(target: Target) -> Target:
    TARGETS[target.name] = target
    return target


def get_target(name: str) -> Target:
    spec = target_spec(name)
    if spec is None:
        raise InputError(f"unknown target {name!r}; choose one of: {', '.join(TARGET_NAMES)}.")
    if name not in TARGETS:
        try:
            module = importlib.import_module(spec.module)
            if name not in TARGETS:  # imported before but unregistered since: register again
                importlib.reload(module)
        except ModuleNotFoundError as e:
            if e.name and e.name.startswith("lorafast_export"):
                raise RuntimeMissingError(
                    f"target {name!r} is not implemented in this version yet."
                ) from None
            raise
    return TARGETS[name]


def require_available(name: str) -> Target:
    t = get_target(name)
    ok, hint = t.available()
    if not ok:
        raise RuntimeMissingError(f"target {name!r} cannot run here: {hint}")
    return t


def all_targets() -> list[str]:
    return list(TARGET_NAMES)


# ------------------------------------------------------------------------------------ checks from declarations


def recorded_path_problems(target_name: str, model_dir: Path) -> list[str]:
    """Relative paths the target recorded in model/ (e.g. genai_config.json's decoder file) that leave model/."""
    problems = []
    spec = target_spec(target_name)
    for file, keys in spec.recorded_paths if spec else ():
        try:
            value = json.loads((model_dir / file).read_text())
            for k in keys:
                value = value[k]
        except (OSError, json.JSONDecodeError, KeyError, TypeError):
            continue  # absent or another layout: nothing recorded there, so nothing to follow
        why = outside_reason(model_dir, value) if isinstance(value, str) else "is not a file name"
        if why:
            problems.append(f"{file} {'.'.join(keys)} = {value!r} {why}")
    return problems
