"""Exact adapter merge: `merge(base, adapters, out_dir, dtype)` writes a merged HF checkpoint, streamed by layer."""

from __future__ import annotations

from pathlib import Path

import torch

from lorafast_export.adapters import Adapter
from lorafast_export.checkpoint import DEFAULT_SHARD_BYTES, write_checkpoint, write_side_files
from lorafast_export.dtypes import torch_dtype
from lorafast_export.merge.stream import (
    MergedStore,
    MergePlan,
    iter_merged_groups,
    known_names,
    plan_merge,
)
from lorafast_export.model.spec import ModelConfig
from lorafast_export.weights import ModelDir

__all__ = ["MergePlan", "merge", "merged_config", "merged_state", "merged_view", "plan_merge"]


def merged_config(plan: MergePlan, dtype: torch.dtype | None) -> dict:
    cfg = dict(plan.base.config.raw)  # the user's config.json, untouched except what the merge changes
    cfg["tie_word_embeddings"] = plan.tie_word_embeddings
    if dtype is not None:
        cfg["dtype"] = str(dtype).removeprefix("torch.")
        cfg.pop("torch_dtype", None)
    return cfg


def merge(
    base: ModelDir,
    adapters: list[Adapter],
    out_dir: Path,
    dtype: str | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    on_group=None,
) -> MergePlan:
    """Merge `adapters` into `base` and write a HF checkpoint (config, shards, tokenizer) into out_dir."""
    plan = plan_merge(base, adapters)
    known_names(plan)
    dt = torch_dtype(dtype)  # None: each base tensor keeps its own dtype
    write_checkpoint(
        iter_merged_groups(plan, dt),
        out_dir,
        merged_config(plan, dt),
        base.tokenizer_files,
        max_shard_bytes,
        on_group,
    )
    return plan


def merged_view(base: ModelDir, adapters: list[Adapter], out_dir: Path, dtype: str | None = None) -> ModelDir:
    """The merged model without writing its weights: out_dir gets config.json and the tokenizer (what targets copy
    and calibration reads); the returned ModelDir's store merges each tensor when it is read (MergedStore)."""
    plan = plan_merge(base, adapters)
    dt = torch_dtype(dtype)
    config = merged_config(plan, dt)
    write_side_files(out_dir, config, base.tokenizer_files)
    return ModelDir(
        out_dir,
        ModelConfig.from_dict(config, str(out_dir / "config.json")),
        MergedStore(plan, dt),
        [out_dir / f.name for f in base.tokenizer_files],
    )


def merged_state(plan: MergePlan, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The whole merged state dict in memory (for small models: validation and tests)."""
    state: dict[str, torch.Tensor] = {}
    for _, tensors in iter_merged_groups(plan, dtype):
        state.update(tensors)
    return state
