"""PEFT adapters (LoRA, rsLoRA, DoRA): adapter_config.json checked, tensors grouped by module, scaling computed.

Lightning checkpoints (adapters/lightning.py) reuse `adapter_from_tensors`.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lorafast_export.errors import InputError, UnsupportedError
from lorafast_export.safeio import LIMITS, read_text
from lorafast_export.weights import WeightStore

SUPPORTED_PEFT = ("LORA",)  # DoRA is LoRA with use_dora=True


@dataclass
class AdapterModule:
    """One adapted module: A [r, in] / B [out, r] (or embedding A [r, vocab] / B [dim, r])."""

    module: str  # base module path, e.g. model.layers.0.self_attn.q_proj
    kind: str  # "linear" | "embedding"
    a: torch.Tensor
    b: torch.Tensor
    scaling: float
    magnitude: torch.Tensor | None = None  # DoRA


@dataclass
class Adapter:
    path: Path
    config: dict
    modules: dict[str, AdapterModule]
    replacements: dict[str, torch.Tensor]  # full tensors replacing base tensors (modules_to_save)
    weight: float = 1.0
    files: list[Path] = field(default_factory=list)

    @property
    def use_dora(self) -> bool:
        return bool(self.config.get("use_dora"))

    @property
    def kind(self) -> str:
        return "dora" if self.use_dora else ("rslora" if self.config.get("use_rslora") else "lora")


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's get_pattern_key: a pattern matches when the module path ends with it (regex, '.'-anchored)."""
    for key, val in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return val
    return default


def parse_adapter_spec(spec: str) -> tuple[str, float]:
    """`path` or `path:weight` (weight a float). Paths containing ':' still work if the suffix isn't a float."""
    if ":" in spec:
        head, tail = spec.rsplit(":", 1)
        try:
            return head, float(tail)
        except ValueError:
            pass
    return spec, 1.0


def read_adapter_config(path: Path) -> dict:
    cfg_path = path / "adapter_config.json"
    if not cfg_path.exists():
        raise InputError(f"{path}: no adapter_config.json; not a PEFT adapter directory.")
    try:
        cfg = json.loads(read_text(cfg_path, "adapter_config.json", LIMITS["config"]))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise InputError(f"{cfg_path}: not valid JSON ({e}).") from None
    if not isinstance(cfg, dict):
        raise InputError(f"{cfg_path}: expected a JSON object.")
    ptype = str(cfg.get("peft_type", "")).upper()
    if ptype not in SUPPORTED_PEFT:
        raise UnsupportedError(
            f"{cfg_path}: peft_type={cfg.get('peft_type')!r} is not supported. Supported: LoRA (incl. rsLoRA "
            "and DoRA). LoHa, LoKr, IA3, prompt/prefix tuning and others cannot be merged into plain weights "
            "by this tool; merge them with PEFT's merge_and_unload first and pass the result as --base."
        )
    for flag, what in (
        ("lora_bias", "LoRA bias"),
        ("use_qalora", "QA-LoRA"),
        ("layer_replication", "layer replication"),
    ):
        if cfg.get(flag):
            raise UnsupportedError(f"{cfg_path}: {what} ({flag}) is not supported yet.")
    if cfg.get("trainable_token_indices"):
        raise UnsupportedError(f"{cfg_path}: trainable_token_indices is not supported yet.")
    check_lora_config(cfg, cfg_path)
    return cfg


def _positive_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def _positive_int(v: object) -> bool:
    return _positive_number(v) and float(v).is_integer()


def _show(v: object) -> str:
    """A config value as the user wrote it (JSON), or its repr when it is not JSON (a pickled hyperparameter)."""
    try:
        return json.dumps(v)
    except (TypeError, ValueError):
        return repr(v)


def _regex_problem(pattern: object) -> str | None:
    if not isinstance(pattern, str):
        return f"{pattern!r} is not a string"
    try:
        re.compile(pattern)
    except re.error as e:
        return f"{pattern!r} is not a valid regular expression ({e})"
    return None


def check_lora_config(cfg: dict, where: Path) -> None:
    """The numbers and patterns a merge computes with: r and every rank_pattern value positive integers, lora_alpha
    and every alpha_pattern value positive and finite (a NaN or Inf alpha would reach the weights), pattern keys
    valid regular expressions (PEFT matches them with re.match), the flags true/false. All problems at once."""
    problems = []
    if not _positive_int(cfg.get("r")):
        problems.append(f"'r' must be a positive integer, got {_show(cfg.get('r'))}")
    if not _positive_number(cfg.get("lora_alpha")):
        problems.append(f"'lora_alpha' must be a positive finite number, got {_show(cfg.get('lora_alpha'))}")
    for key_name, ok, want in (
        ("rank_pattern", _positive_int, "a positive integer"),
        ("alpha_pattern", _positive_number, "a positive finite number"),
    ):
        patterns = cfg.get(key_name) or {}
        if not isinstance(patterns, dict):
            problems.append(
                f"{key_name!r} must be an object (module pattern -> value), got {_show(patterns)}"
            )
            continue
        for key, value in patterns.items():
            why = _regex_problem(key)
            if why:
                problems.append(f"{key_name}: key {why}")
            if not ok(value):
                problems.append(f"{key_name}[{key!r}] must be {want}, got {_show(value)}")
    target = cfg.get("target_modules")
    if isinstance(target, str) and target != "all-linear" and _regex_problem(target):
        problems.append(f"target_modules: {_regex_problem(target)}")
    elif isinstance(target, list) and not all(isinstance(t, str) for t in target):
        problems.append(f"target_modules must be a list of module names, got {_show(target)}")
    for flag in ("use_rslora", "use_dora", "fan_in_fan_out"):
        if cfg.get(flag) is not None and not isinstance(cfg.get(flag), bool):
            problems.append(f"{flag!r} must be true or false, got {_show(cfg.get(flag))}")
    if problems:
        raise InputError(
            f"{where}: {len(problems)} problem(s) in the adapter config:\n  - " + "\n  - ".join(problems)
        )


def open_peft_adapter(path: Path, weight: float, allow_pickle: bool = False) -> Adapter:
    """A PEFT adapter directory (adapter_config.json + adapter_model.safetensors, or a pickle with allow_pickle)."""
    if not path.is_dir():
        raise InputError(f"{path}: adapter directory not found.")
    cfg = read_adapter_config(path)
    st = path / "adapter_model.safetensors"
    if st.exists():
        store = WeightStore([st])
    else:
        pickled = [p for p in (path / "adapter_model.bin", path / "adapter_model.pt") if p.exists()]
        if not pickled:
            raise InputError(f"{path}: no adapter_model.safetensors found.")
        store = WeightStore(pickled, allow_pickle)
    tensors = {k: store.get(k) for k in store.keys()}
    return adapter_from_tensors(path, cfg, tensors, weight, store.files)


def _strip(key: str) -> str:
    for prefix in ("base_model.model.",):
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


def adapter_from_tensors(
    path: Path, cfg: dict, tensors: dict[str, torch.Tensor], weight: float, files: list[Path]
) -> Adapter:
    """Group PEFT state-dict tensors by module and compute each module's scaling from the config."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    replacements: dict[str, torch.Tensor] = {}
    suffixes = (
        "lora_A.weight",
        "lora_B.weight",
        "lora_embedding_A",
        "lora_embedding_B",
        "lora_magnitude_vector",
    )
    for key, t in tensors.items():
        k = _strip(key)
        for suf in suffixes:
            if k.endswith("." + suf):
                groups.setdefault(k[: -len(suf) - 1], {})[suf] = t
                break
        else:
            if ".base_layer." in k:  # PEFT saved the (possibly resized) base embedding alongside the adapter
                replacements[k.replace(".base_layer.", ".")] = t
            elif k.endswith(".weight") or k.endswith(".bias"):
                replacements[k.replace(".modules_to_save.", ".")] = t  # modules_to_save: full replacement
            else:
                raise InputError(f"{path}: unexpected tensor {key!r} in the adapter; is this a LoRA adapter?")
    modules = {m: _make_module(path, cfg, m, g) for m, g in sorted(groups.items())}
    return Adapter(path, cfg, modules, replacements, weight, files)


def _make_module(path: Path, cfg: dict, module: str, g: dict[str, torch.Tensor]) -> AdapterModule:
    emb = "lora_embedding_A" in g
    a, b = (
        (g.get("lora_embedding_A"), g.get("lora_embedding_B"))
        if emb
        else (g.get("lora_A.weight"), g.get("lora_B.weight"))
    )
    if a is None or b is None:
        raise InputError(
            f"{path}: module {module!r} has only one of lora_A/lora_B; the adapter file is incomplete."
        )
    r = a.shape[0]
    if b.shape[-1] != r:
        raise InputError(f"{path}: {module}: lora_A has rank {r} but lora_B has shape {tuple(b.shape)}.")
    expected_r = _pattern_value(cfg.get("rank_pattern") or {}, module, cfg["r"])
    if int(expected_r) != r:
        raise InputError(f"{path}: {module}: tensors have rank {r} but adapter_config says r={expected_r}.")
    alpha = _pattern_value(cfg.get("alpha_pattern") or {}, module, cfg["lora_alpha"])
    scaling = lora_scaling(float(alpha), r, bool(cfg.get("use_rslora")))
    mag = g.get("lora_magnitude_vector")
    if emb and mag is not None:
        raise UnsupportedError(f"{path}: DoRA on an embedding ({module}) is not supported yet.")
    return AdapterModule(
        module,
        "embedding" if emb else "linear",
        a.float(),
        b.float(),
        scaling,
        None if mag is None else mag.float(),
    )


def lora_scaling(alpha: float, r: int, use_rslora: bool) -> float:
    """PEFT's scaling of B @ A: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r
