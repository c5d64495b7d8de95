"""The one place targets are registered. A new target is one new module plus one line in _MODULES.

Besides lower/load, a target may declare what it cannot do as data, so that the recipe is refused when it is read
(before any work), together with every other recipe problem:
- `recipe_rules`: RecipeRule(field, ok, fix) for limits that recipe fields alone show (e.g. a group size);
- `option_problems(options, dtype)`: its own check of target.options and target.dtype, one message per problem;
- `recorded_paths`: (JSON file, key path) of every relative path it writes into model/, which `verify` and
  loading check stay inside the artifact.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from lorafast_export.errors import InputError, RuntimeMissingError

# target name → module that defines and registers it (imported lazily: heavy runtimes load only when used)
_MODULES = {
    "hf": "lorafast_export.targets.hf.target",
    "torch-compile": "lorafast_export.targets.torch_compile.target",
    "onnxruntime": "lorafast_export.targets.onnxruntime.target",
    "openvino": "lorafast_export.targets.openvino.target",
    "trt-llm": "lorafast_export.targets.trt_llm.target",
}
TARGETS: dict[str, Target] = {}


@dataclass
class LowerInput:
    """What every target receives: the merged checkpoint, and the quantized form when a method ran."""

    merged_dir: Path  # HF checkpoint of the merged model (config.json, safetensors, tokenizer)
    config: Any  # lorafast_export.model.spec.ModelConfig
    recipe: Any  # lorafast_export.recipe.Recipe
    quantized: Any = None  # lorafast_export.quant.QuantizedModel, or None
    extra: dict = field(default_factory=dict)


class Session(Protocol):
    """A loaded artifact, as validation and bench use it."""

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor: ...  # [b, s] → [b, s, V] fp32

    def generate(self, input_ids: list[int], max_new_tokens: int) -> list[int]: ...  # greedy, new tokens only


@dataclass(frozen=True)
class RecipeRule:
    """One limit of a target that the recipe alone shows: `ok(value, values)` must hold for the resolved value of
    `field` (per-method defaults filled in; `values`: every resolved field, see resolved_fields), else `fix`."""

    field: str  # dotted recipe field, as the error names it, e.g. "quant.group_size"
    ok: Callable[[Any, dict[str, Any]], bool]
    fix: str  # why the target cannot, and what to use instead


class Target(Protocol):
    name: str
    install_hint: str
    # optional (see the module doc): recipe_rules, option_problems(options, dtype), recorded_paths

    def available(self) -> tuple[bool, str]: ...

    def lower(
        self, inp: LowerInput, out_dir: Path
    ) -> dict: ...  # writes model/ ; returns facts for the manifest

    def load(self, model_dir: Path, device: str = "cpu") -> Session: ...


def register(target: Target) -> Target:
    TARGETS[target.name] = target
    return target


def get_target(name: str) -> Target:
    if name not in _MODULES:
        raise InputError(f"unknown target {name!r}; choose one of: {', '.join(_MODULES)}.")
    if name not in TARGETS:
        try:
            module = importlib.import_module(_MODULES[name])
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
    return list(_MODULES)


# ------------------------------------------------------------------------------------ checks from declarations


def resolved_fields(recipe, requires_symmetric: bool = False) -> dict[str, Any]:
    """Dotted recipe field → the value lowering will see (quant defaults of the method and target filled in)."""
    from lorafast_export.quant.config import resolved_record

    values = {f"quant.{k}": v for k, v in resolved_record(recipe.quant, requires_symmetric).items()}
    values |= {f"target.{k}": v for k, v in recipe.target.model_dump().items()}
    return values | {"merge.dtype": recipe.merge.dtype}


def recipe_problems(recipe) -> list[str]:
    """What the recipe's target cannot do, knowable from the recipe alone; each problem names its field + fix."""
    target = get_target(recipe.target.name)
    values = resolved_fields(recipe, getattr(target, "requires_symmetric", False))
    problems = [
        f"{r.field}: {values[r.field]!r} is not possible with target {target.name}: {r.fix}"
        for r in getattr(target, "recipe_rules", ())
        if not r.ok(values[r.field], values)
    ]
    check = getattr(target, "option_problems", None)
    if check is not None:
        problems += check(dict(recipe.target.options or {}), recipe.target.dtype)
    return problems


def recorded_path_problems(target: Target, model_dir: Path) -> list[str]:
    """Relative paths the target recorded in model/ (e.g. genai_config.json's decoder file) that leave model/."""
    from lorafast_export.recipe import outside_reason

    problems = []
    for file, keys in getattr(target, "recorded_paths", ()):
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
