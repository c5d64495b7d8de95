"""Weight-only INT8: per output channel, symmetric (the signed grid: scale = extreme / -128, implicit zero 128)."""

from __future__ import annotations

import torch

from lorafast_export.qform import QTensor
from lorafast_export.quant.rtn import quantize_rtn


def quantize_int8_weight(
    w: torch.Tensor, bias: torch.Tensor | None = None, scale_dtype: torch.dtype = torch.float32
) -> QTensor:
    """w [out, in] → 8-bit per-channel symmetric QTensor (scales [out, 1])."""
    return quantize_rtn(w, bits=8, group_size=-1, symmetric=True, scale_dtype=scale_dtype, bias=bias)
