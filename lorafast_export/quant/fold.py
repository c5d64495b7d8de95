"""Fold a per-input-channel scale s into the op before a group of linears (AWQ and SmoothQuant).

    y = W · x = (W · diag(s)) · (x / s)

The previous op (a norm's weight vector, or a linear whose output rows feed these linears) is divided
by s along its output channels, the linears' input columns are multiplied by s: the unrounded output is
unchanged, while activations shrink where s > 1 and weights grow there.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from lorafast_export.errors import InputError


class Folded(NamedTuple):
    prev_weight: torch.Tensor  # [in] (norm) or [in, prev_in] (linear)
    prev_bias: torch.Tensor | None  # [in]
    linears: list[torch.Tensor]  # each [out_i, in]


def fold_scale_into_previous(
    prev_weight: torch.Tensor,
    linears: Sequence[torch.Tensor],
    s: torch.Tensor,
    prev_bias: torch.Tensor | None = None,
    norm_offset: float = 0.0,
) -> Folded:
    """prev / s (output channels), linears * s (input columns); new tensors in the inputs' dtypes.

    norm_offset: for norms that compute x * (offset + weight) (Gemma's RMSNorm uses 1.0), the
    effective weight offset + weight is what gets divided.
    """
    _check_fold_shapes(prev_weight, linears, s, prev_bias)
    sf = s.detach().to(_math_dtype(s))  # [in]
    pw = prev_weight.detach().to(_math_dtype(prev_weight))
    if prev_weight.dim() == 1:  # norm weight [in]
        new_prev = (pw + norm_offset) / sf - norm_offset
    else:  # linear weight [in, prev_in]: scale its output rows
        new_prev = pw / sf[:, None]
    new_bias = None if prev_bias is None else (prev_bias.to(_math_dtype(prev_bias)) / sf).to(prev_bias.dtype)
    new_linears = [(w.detach().to(_math_dtype(w)) * sf[None, :]).to(w.dtype) for w in linears]
    return Folded(new_prev.to(prev_weight.dtype), new_bias, new_linears)


def _math_dtype(t: torch.Tensor) -> torch.dtype:
    """At least float32 (half-precision weights are scaled in float32, float64 stays float64)."""
    return torch.promote_types(t.dtype, torch.float32)


def _check_fold_shapes(
    prev_weight: torch.Tensor,
    linears: Sequence[torch.Tensor],
    s: torch.Tensor,
    prev_bias: torch.Tensor | None,
) -> None:
    n = s.shape[0] if s.dim() == 1 else -1
    problems = []
    if s.dim() != 1 or not bool((s > 0).all()) or not bool(torch.isfinite(s).all()):
        problems.append(f"s must be a positive finite vector [in], got shape {tuple(s.shape)}")
    if prev_weight.dim() not in (1, 2) or prev_weight.shape[0] != n:
        problems.append(
            f"previous op weight {tuple(prev_weight.shape)} must be [in={n}] (norm) or "
            f"[in={n}, prev_in] (linear feeding these linears)"
        )
    if prev_bias is not None and tuple(prev_bias.shape) != (n,):
        problems.append(f"previous op bias {tuple(prev_bias.shape)} must be [in={n}]")
    problems += [
        f"linears[{i}] {tuple(w.shape)} must be [out, in={n}]"
        for i, w in enumerate(linears)
        if w.dim() != 2 or w.shape[1] != n
    ]
    if not linears:
        problems.append("no linears given to fold the scale into")
    if problems:
        raise InputError(
            "fold_scale_into_previous: "
            + "; ".join(problems)
            + ". Fold only into an op whose output channels are exactly the linears' inputs "
            "(e.g. skip v_proj→o_proj under grouped-query attention)."
        )
