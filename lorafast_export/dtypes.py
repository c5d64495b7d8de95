"""Floating dtypes by name: the one map from the names recipes and artifacts use (specs.DTYPES) to torch's."""

from __future__ import annotations

import torch

from lorafast_export.specs import DTYPES

TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
SHORT_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
assert tuple(TORCH_DTYPES) == DTYPES


def torch_dtype(name: str | None) -> torch.dtype | None:
    """None/'auto' → None (keep each tensor's own dtype); a dtype name → torch's dtype."""
    return None if name in (None, "auto") else TORCH_DTYPES[name]
