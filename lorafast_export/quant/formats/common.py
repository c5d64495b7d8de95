"""Small checks shared by the checkpoint packers."""

from __future__ import annotations

import torch

from lorafast_export.errors import InputError
from lorafast_export.qform import QTensor


def cast_scales(scales: torch.Tensor, dtype: torch.dtype, allow_rounding: bool, fmt: str) -> torch.Tensor:
    """Scales in the checkpoint's dtype; refuse a lossy cast unless asked (the IR would no longer match)."""
    cast = scales.to(dtype)
    if not allow_rounding and not torch.equal(cast.to(scales.dtype), scales):
        raise InputError(
            f"{fmt}: scales ({scales.dtype}) are not exactly representable in {dtype}, so the "
            f"checkpoint would not match the quantized model. Quantize with scale_dtype={dtype} "
            "or pass allow_scale_rounding=True."
        )
    return cast.contiguous()


def require(qt: QTensor, fmt: str, **conditions: tuple[bool, str]) -> None:
    """conditions: name → (ok, fix). Raise one InputError listing every failed condition."""
    failed = [f"{name}: {fix}" for name, (ok, fix) in conditions.items() if not ok]
    if failed:
        raise InputError(
            f"{fmt} cannot store this layer ({qt.out_features}x{qt.in_features}, "
            f"bits={qt.bits}, group_size={qt.group_size}):\n  - " + "\n  - ".join(failed)
        )
