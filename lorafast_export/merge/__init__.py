"""Exact adapter merge: `merge(base, adapters, out_dir, dtype)` writes a merged HF checkpoint, streamed by layer."""

from __future__ import annotations

from pathlib import Path

import torch

from lorafast_export.checkpoint import DEFAULT_SHARD_BYTES, write_checkpoint
from lorafast_export.load import Adapter, ModelDir
from lorafast_export.merge.stream import DTYPES, MergePlan, iter_merged_groups, known_names, plan_merge

__all__ = ["DTYPES", "MergePlan", "merge", "merged_config", "merged_state", "plan_merge"]


def resolve_dtype(name: str | None) -> torch.dtype | None:
    """None/'auto' keeps each base tensor's own dtype."""
    return None if name in (None, "auto") else DTYPES[name]


def merged_config(plan: MergePlan, dtype: torch.dtype | None) -> dict:
    cfg = dict(plan.base.config.raw)  # the user's config.json, untouched except what the merge changes
    cfg["tie_word_embeddings"] = plan.tie_word_embeddings
    if dtype is not None:
        cfg["dtype"] = str(dtype).removeprefix("torch.")
        cfg.pop("torch_dtype", None)
    return cfg


def merge(base: ModelDir, adapters: list[Adapter], out_dir: Path, dtype: str | None = None,
          max_shard_bytes: int = DEFAULT_SHARD_BYTES, on_group=None) -> MergePlan:
    """Merge `adapters` into `base` and write a HF checkpoint (config, shards, tokenizer) into out_dir."""
    plan = plan_merge(base, adapters)
    known_names(plan)
    dt = resolve_dtype(dtype)
    write_checkpoint(iter_merged_groups(plan, dt), out_dir, merged_config(plan, dt), base.tokenizer_files,
                     max_shard_bytes, on_group)
    return plan


def merged_state(plan: MergePlan, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The whole merged state dict in memory (for small models: validation and tests)."""
    state: dict[str, torch.Tensor] = {}
    for _, tensors in iter_merged_groups(plan, dtype):
        state.update(tensors)
    return state
