"""Adapter merge math: pure tensor functions, fp32 inside, no model or file knowledge.

Definitions follow PEFT 0.21 (peft/tuners/lora/layer.py and dora.py):
  LoRA:   W' = W + s * B @ A,   s = alpha / r   (rsLoRA: alpha / sqrt(r))
  DoRA:   W' = (m / ||W + s * B @ A||_row) [:, None] * (W + s * B @ A)
  Embedding LoRA: E' = E + s * (B @ A).T   (A: [r, vocab], B: [dim, r])
Weights are stored [out, in] unless the adapter was trained with fan_in_fan_out (GPT-2 Conv1D style).
"""

from __future__ import annotations

import math

import torch


def lora_scaling(alpha: float, r: int, use_rslora: bool) -> float:
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def lora_delta(a: torch.Tensor, b: torch.Tensor, scaling: float, fan_in_fan_out: bool = False) -> torch.Tensor:
    """ΔW [out, in] from A [r, in] and B [out, r] (transposed back when fan_in_fan_out)."""
    delta = (b.double() @ a.double()) * scaling  # [out, in]; fp64 product so the merge adds no error of its own
    return (delta.T if fan_in_fan_out else delta).float()


def embedding_delta(a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """ΔE [vocab, dim] from lora_embedding_A [r, vocab] and lora_embedding_B [dim, r]."""
    return ((b.double() @ a.double()).T * scaling).float()


def dora_merge(w: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """DoRA merge of a linear weight w [out, in] with LoRA delta [out, in] and magnitude [out]."""
    combined = w.double() + delta.double()  # [out, in]
    norm = torch.linalg.norm(combined, dim=1)  # [out]; PEFT: norm over the input dim, per output row
    return (magnitude.double() / norm)[:, None] * combined  # fp64; merge_linear casts once at the end


def merge_linear(w: torch.Tensor, contributions: list[tuple[torch.Tensor, torch.Tensor | None, float]]) -> torch.Tensor:
    """Merge adapters [(ΔW, DoRA magnitude or None, weight)] into w [out, in]; returns fp32.

    Several adapters combine as  W' = W + Σ_i weight_i · (merge_i(W) − W), where merge_i is that adapter's own
    LoRA or DoRA merge against the base weight. With all weights 1 this is exactly what PEFT computes with
    several active adapters; for LoRA alone it is the usual weighted sum of deltas.
    """
    w64 = w.double()
    out = w64.clone()
    for delta, magnitude, weight in contributions:
        if magnitude is None:
            out += weight * delta.double()
        else:
            out += weight * (dora_merge(w64, delta, magnitude).double() - w64)
    return out.float()
