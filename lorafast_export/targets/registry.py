"""The one place targets are registered. A new target is one new module plus one line in _MODULES."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from lorafast_export.errors import InputError, RuntimeMissingError

# target name → module that defines and registers it (imported lazily: heavy runtimes load only when used)
_MODULES = {
    "hf": "lorafast_export.targets.hf",
    "torch-compile": "lorafast_export.targets.torch_compile",
    "onnxruntime": "lorafast_export.targets.onnxruntime",
    "openvino": "lorafast_export.targets.openvino",
    "trt-llm": "lorafast_export.targets.trtllm",
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


class Target(Protocol):
    name: str
    install_hint: str

    def available(self) -> tuple[bool, str]: ...

    def lower(self, inp: LowerInput, out_dir: Path) -> dict: ...  # writes model/ ; returns facts for the manifest

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
                raise RuntimeMissingError(f"target {name!r} is not implemented in this version yet.") from None
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
