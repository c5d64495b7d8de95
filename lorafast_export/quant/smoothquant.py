"""SmoothQuant (Xiao et al. 2023): migrate activation outliers into the weights, then W8A8.

s_j = max|X_j|^alpha / max|W_:,j|^(1-alpha); the norm before the linears is divided by s, the linears'
input columns multiplied by s (fold.fold_scale_into_previous), then weights are quantized int8 per
channel and activations int8 per token at run time (act_quant="int8_per_token_dynamic").
Reference: mit-han-lab/smoothquant smoothquant/smooth.py (smooth_ln_fcs).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lorafast_export.errors import InputError
from lorafast_export.qform import ACT_QUANT_INT8_PER_TOKEN, QTensor, with_fields
from lorafast_export.quant.fold import Folded, fold_scale_into_previous
from lorafast_export.quant.int8 import quantize_int8_weight

__all__ = ["Folded", "fold_scale_into_previous", "quantize_w8a8", "smooth_scales", "weight_input_absmax"]


def weight_input_absmax(weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """Linears sharing one input, each [out_i, in] → max |W| per input column over all of them [in]."""
    return torch.stack([w.detach().float().abs().amax(dim=0) for w in weights]).amax(dim=0)


def smooth_scales(act_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """act_absmax [in] (calibration max |x| per channel), w_absmax [in] → s [in] (positive)."""
    if not 0.0 <= alpha <= 1.0:
        raise InputError(f"smoothquant alpha={alpha}: use a value in [0, 1] (0.5 is the usual choice).")
    if act_absmax.shape != w_absmax.shape or act_absmax.dim() != 1:
        raise InputError(
            f"smooth_scales: act_absmax {tuple(act_absmax.shape)} and w_absmax "
            f"{tuple(w_absmax.shape)} must both be [in]."
        )
    a = act_absmax.float().clamp(min=1e-5)
    w = w_absmax.float().clamp(min=1e-5)
    return (a.pow(alpha) / w.pow(1.0 - alpha)).clamp(min=1e-5)


def quantize_w8a8(
    w: torch.Tensor,
    input_scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    scale_dtype: torch.dtype = torch.float32,
) -> QTensor:
    """Already-smoothed w [out, in] → int8 per-channel symmetric weights + dynamic per-token int8 inputs.

    input_scale is the s that was folded (bookkeeping only).
    """
    qt = quantize_int8_weight(w, bias=bias, scale_dtype=scale_dtype)
    return with_fields(
        qt,
        act_quant=ACT_QUANT_INT8_PER_TOKEN,
        input_scale=None if input_scale is None else input_scale.detach().float().clone(),
    )
