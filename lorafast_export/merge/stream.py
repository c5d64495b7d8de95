"""Merge orchestration: check adapters against the base, then stream merged tensors one decoder layer at a time.

Only one layer's base tensors (read tensor by tensor, not memory-mapped) and their merged copies are alive at once, so peak memory is a
few layers, not the model. The math lives in merge/math.py.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from lorafast_export.adapters import Adapter
from lorafast_export.dtypes import all_finite
from lorafast_export.errors import InputError
from lorafast_export.merge.math import embedding_delta, lora_delta, merge_linear
from lorafast_export.model.spec import ATTN_PROJ, EMBED, FINAL_NORM, LM_HEAD, MLP_PROJ, layer_prefix
from lorafast_export.weights import ModelDir

log = logging.getLogger(__name__)


@dataclass
class MergePlan:
    base: ModelDir
    adapters: list[Adapter]
    untie: bool = False  # tied embeddings whose input and output sides the adapters change differently
    notes: list[str] = field(default_factory=list)

    @property
    def tie_word_embeddings(self) -> bool:
        return self.base.config.tie_word_embeddings and not self.untie


def plan_merge(base: ModelDir, adapters: list[Adapter]) -> MergePlan:
    """Check every adapter module against the base (all problems reported at once)."""
    problems: list[str] = []
    for ad in adapters:
        for m in ad.modules.values():
            problems += _check_module(base, ad, m)
        for name, t in ad.replacements.items():
            if name not in base.store and not (name == LM_HEAD and base.config.tie_word_embeddings):
                problems.append(f"{ad.path}: replaces {name!r}, which the base does not have")
                continue
            ref = base.store.get(EMBED if name not in base.store else name)
            if tuple(ref.shape) != tuple(t.shape):
                problems.append(
                    f"{ad.path}: {name} has shape {tuple(t.shape)} but the base's is {tuple(ref.shape)}"
                    + _vocab_hint(base, name)
                )
        problems += _non_finite(ad)
        problems += _target_problems(base, ad)
    if problems:
        raise InputError("adapter does not fit the base model:\n  - " + "\n  - ".join(problems))
    plan = MergePlan(base, adapters)
    if base.config.tie_word_embeddings:
        touched = {
            n for ad in adapters for n in [*ad.modules, *(r.rsplit(".", 1)[0] for r in ad.replacements)]
        }
        if touched & {"model.embed_tokens", "lm_head"}:
            plan.untie = True
            plan.notes.append(
                "the base ties lm_head to embed_tokens, but the adapter changes one side only; the merged model "
                "unties them (as the unmerged PEFT model computes), adding a vocab x hidden lm_head.weight"
            )
            log.warning(plan.notes[-1])
    return plan


def peft_targets(target_modules: str | list[str], key: str) -> bool:
    """PEFT's check_target_module_exists: a regex string must match the whole module path; a list entry must
    equal it or be a '.'-separated suffix of it; "all-linear" is every linear layer but the output head."""
    if target_modules == "all-linear":
        return key != "lm_head" and key.rsplit(".", 1)[-1] in (*ATTN_PROJ, *MLP_PROJ)
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, key) is not None
    return any(key == t or key.endswith(f".{t}") for t in target_modules)


def _target_problems(base: ModelDir, ad: Adapter) -> list[str]:
    """The adapter's target_modules, as PEFT will apply them for the reference: they must match modules of the
    base, and cover every module the adapter has tensors for (PEFT drops tensors of untargeted modules)."""
    target = ad.config.get("target_modules")
    if not ad.modules and not ad.replacements:
        return [f"{ad.path}: the adapter has no LoRA tensors (lora_A/lora_B); nothing would change"]
    if target is None:  # Lightning checkpoints: the tensors say where the adapter applies
        return []
    modules = sorted({k.rsplit(".", 1)[0] for k in base.store.keys()})
    if not any(peft_targets(target, m) for m in modules):
        kinds = sorted({m.rsplit(".", 1)[-1] for m in modules if ".layers." in m})
        return [
            f"{ad.path}: adapter_config.json target_modules={target!r} matches no module of the base "
            f"(its modules are named e.g. {', '.join(kinds[:8])}); is this adapter for another model?"
        ]
    untargeted = [m for m in ad.modules if not peft_targets(target, m)]
    if untargeted:
        return [
            f"{ad.path}: the adapter has tensors for {untargeted[0]!r}"
            + (f" (+{len(untargeted) - 1} more)" if len(untargeted) > 1 else "")
            + f", which target_modules={target!r} does not name; PEFT would ignore them. Fix target_modules "
            "in adapter_config.json."
        ]
    return []


def _non_finite(ad: Adapter) -> list[str]:
    """Adapter tensors holding NaN/Inf (lora_A, lora_B, DoRA magnitudes, modules_to_save replacements)."""
    tensors = [(f"lora_A of {m.module}", m.a) for m in ad.modules.values()]
    tensors += [(f"lora_B of {m.module}", m.b) for m in ad.modules.values()]
    tensors += [(f"DoRA magnitude of {m.module}", m.magnitude) for m in ad.modules.values()]
    tensors += [(f"replacement {name}", t) for name, t in ad.replacements.items()]
    return [
        f"{ad.path}: {what} contains NaN/Inf values"
        for what, t in tensors
        if t is not None and not all_finite(t)
    ]


def _vocab_hint(base: ModelDir, name: str) -> str:
    if "embed" in name or "lm_head" in name:
        return f" (vocab mismatch: base vocab_size={base.config.vocab_size}; was the adapter trained on another model?)"
    return ""


def _check_module(base: ModelDir, ad: Adapter, m) -> list[str]:
    wname = m.module + ".weight"
    if wname not in base.store:
        near = [
            k[:-7]
            for k in base.store.keys()
            if k.endswith(".weight") and k.split(".")[-2] == m.module.split(".")[-1]
        ]
        hint = f" (base has e.g. {near[0]})" if near else ""
        return [
            f"{ad.path}: adapted module {m.module!r} does not exist in the base{hint}; "
            "is this adapter for another model?"
        ]
    shape = tuple(base.store.shape_of(wname))  # from the header: reading 224 weights at 8B took ~9 s per plan
    if m.kind == "embedding":
        want_a, want_b = (m.a.shape[0], shape[0]), (shape[1], m.a.shape[0])
    else:
        want_a, want_b = (m.a.shape[0], shape[1]), (shape[0], m.a.shape[0])
    if tuple(m.a.shape) != want_a or tuple(m.b.shape) != want_b:
        return [
            f"{ad.path}: {m.module}: base weight is {shape} but lora_A is {tuple(m.a.shape)} and lora_B is "
            f"{tuple(m.b.shape)} (expected {want_a} and {want_b})" + _vocab_hint(base, m.module)
        ]
    if m.magnitude is not None and tuple(m.magnitude.shape) != (shape[0],):
        return [
            f"{ad.path}: {m.module}: DoRA magnitude has shape {tuple(m.magnitude.shape)}, base has {shape[0]} rows"
        ]
    return []


def base_source_name(plan: MergePlan, name: str) -> str:
    """The base tensor a merged tensor starts from: an untied lm_head starts as the embeddings."""
    return EMBED if (name == LM_HEAD and name not in plan.base.store) else name


def _merge_tensor(plan: MergePlan, name: str, out_dtype: torch.dtype | None) -> torch.Tensor:
    """One merged tensor: replacement (modules_to_save) or base, plus every adapter's delta."""
    src = base_source_name(plan, name)
    base = plan.base.store.get(src)
    if not all_finite(base):
        raise InputError(
            f"{plan.base.path}: tensor {src!r} contains NaN/Inf values; the base checkpoint is damaged."
        )
    merged = merge_onto(plan, name, base).to(out_dtype or base.dtype)
    if not all_finite(merged):
        raise InputError(_overflow_message(plan, name, merged.dtype))
    return merged


def merge_onto(plan: MergePlan, name: str, base: torch.Tensor) -> torch.Tensor:
    """Merged tensor `name` from its base tensor (on any device; the result is on that device): the
    modules_to_save replacement or `base` itself, plus every adapter's delta merged in fp32 (fp64 inside).
    Returned unchanged (base dtype) when no adapter touches it."""
    for ad in plan.adapters:
        if name in ad.replacements:
            base = ad.replacements[name].to(base.device)  # modules_to_save replaces the module outright
    module = name[: -len(".weight")] if name.endswith(".weight") else None
    contributions = []
    for ad in plan.adapters:
        m = ad.modules.get(module) if module else None
        if m is None:
            continue
        a, b = m.a.to(base.device), m.b.to(base.device)
        # fan_in_fan_out only applies to Conv1D bases; PEFT resets it to False for nn.Linear, and so do we.
        delta = embedding_delta(a, b, m.scaling) if m.kind == "embedding" else lora_delta(a, b, m.scaling)
        mag = None if m.magnitude is None else m.magnitude.to(base.device)
        contributions.append((delta, mag, ad.weight))
    if not contributions:
        return base
    return merge_linear(base, contributions)  # rows go to fp64 from the stored dtype (exact)


def _overflow_message(plan: MergePlan, name: str, dtype: torch.dtype) -> str:
    """Why a merged tensor of finite inputs is not finite, and what to change."""
    scales = ", ".join(
        f"{ad.path} (lora_alpha={ad.config.get('lora_alpha')!r}, weight={ad.weight})" for ad in plan.adapters
    )
    return (
        f"merged tensor {name!r} ({str(dtype).removeprefix('torch.')}) has NaN/Inf values; nothing was written. "
        f"The base and adapter tensors are finite, so the merge overflowed: check the adapters' scale ({scales}) "
        "or, if the values only exceed the output dtype, merge into a wider one (--dtype float32 or bfloat16)."
    )


def layer_tensor_names(plan: MergePlan, i: int) -> list[str]:
    p = layer_prefix(i)
    return sorted(
        k for k in plan.base.store.keys() if k.startswith(p) and not k.endswith("rotary_emb.inv_freq")
    )


def iter_merged_groups(
    plan: MergePlan, dtype: torch.dtype | None = None
) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
    """Yield ("embed", {...}), ("layer.0", {...}), ..., ("final", {...}): merged tensors, one group at a time."""
    cfg = plan.base.config
    yield "embed", {EMBED: _merge_tensor(plan, EMBED, dtype)}
    for i in range(cfg.num_layers):
        yield f"layer.{i}", {n: _merge_tensor(plan, n, dtype) for n in layer_tensor_names(plan, i)}
    final = {FINAL_NORM: _merge_tensor(plan, FINAL_NORM, dtype)}
    if not plan.tie_word_embeddings:
        final[LM_HEAD] = _merge_tensor(plan, LM_HEAD, dtype)
    yield "final", final


def known_names(plan: MergePlan) -> set[str]:
    """Every base tensor the merge will emit; anything else in the checkpoint is reported, not dropped silently."""
    cfg = plan.base.config
    names = {EMBED, FINAL_NORM, LM_HEAD}
    for i in range(cfg.num_layers):
        names.update(layer_tensor_names(plan, i))
    extra = [
        k for k in plan.base.store.keys() if k not in names and not re.search(r"rotary_emb\.inv_freq$", k)
    ]
    if extra:
        raise InputError(f"{plan.base.path}: unexpected tensors {extra[:5]} for a {cfg.family} checkpoint.")
    return names


class MergedStore:
    """The merged model as a read-only weight store that merges on read: `get(name)` computes one merged tensor
    from the base and the adapters (the same `_merge_tensor` the written checkpoint comes from, so the values are
    identical). Quantized builds read through it instead of writing a merged copy of the model to disk."""

    def __init__(self, plan: MergePlan, dtype: torch.dtype | None = None):
        self.plan, self.dtype = plan, dtype
        names = known_names(plan)
        if plan.tie_word_embeddings:
            names.discard(LM_HEAD)
        elif LM_HEAD not in plan.base.store:
            names.add(LM_HEAD)  # untied: the head starts as a copy of the embeddings
        self._names = sorted(names)
        self.files: list = []  # nothing on disk is this store's own

    def keys(self) -> list[str]:
        return list(self._names)

    def __contains__(self, name: str) -> bool:
        return name in self._names

    def get(self, name: str) -> torch.Tensor:
        if name not in self._names:
            raise InputError(f"tensor {name!r} is not part of the merged model of {self.plan.base.path}.")
        return _merge_tensor(self.plan, name, self.dtype)

    def shape_of(self, name: str) -> tuple[int, ...]:
        src = EMBED if (name == LM_HEAD and name not in self.plan.base.store) else name
        return self.plan.base.store.shape_of(src)

    def dtype_of(self, name: str) -> torch.dtype:
        src = EMBED if (name == LM_HEAD and name not in self.plan.base.store) else name
        return self.dtype or self.plan.base.store.dtype_of(src)
