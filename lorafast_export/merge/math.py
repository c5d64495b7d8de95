"""Adapter merge math: pure tensor functions, fp32 inside, no model or file knowledge.

Definitions follow PEFT 0.21 (peft/tuners/lora/layer.py and dora.py):
  LoRA:   W' = W + s * B @ A,   s = alpha / r   (rsLoRA: alpha / sqrt(r))
  DoRA:   W' = (m / ||W + s * B @ A||_row) [:, None] * (W + s * B @ A)
  Embedding LoRA: E' = E + s * (B @ A).T   (A: [r, vocab], B: [dim, r])
Weights are stored [out, in] unless the adapter was trained with fan_in_fan_out (GPT-2 Conv1D style).
"""

from __future__ import annotations

import torch


def lora_delta(
    a: torch.Tensor, b: torch.Tensor, scaling: float, fan_in_fan_out: bool = False
) -> torch.Tensor:
    """ΔW [out, in] from A [r, in] and B [out, r] (transposed back when fan_in_fan_out)."""
    delta = (
        b.double() @ a.double()
    ) * scaling  # [out, in]; fp64 product so the merge adds no error of its own
    return (delta.T if fan_in_fan_out else delta).float()


def embedding_delta(a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """ΔE [vocab, dim] from lora_embedding_A [r, vocab] and lora_embedding_B [dim, r]."""
    return ((b.double() @ a.double()).T * scaling).float()


ROW_CHUNK_ELEMENTS = 1 << 22  # rows are merged in chunks of ~4M elements: fp64 temporaries stay ~100 MB


def merge_linear(
    w: torch.Tensor, contributions: list[tuple[torch.Tensor, torch.Tensor | None, float]]
) -> torch.Tensor:
    """Merge adapters [(ΔW, DoRA magnitude or None, weight)] into w [out, in], in order; returns fp32.

    Several adapters apply in the given order, as PEFT computes with several active adapters: a LoRA adds
    weight·ΔW; a DoRA with factor f = m / ||W_base + ΔW|| (norm of the BASE weight plus its own delta) turns the
    accumulated W into  W + weight·((f − 1)·W + f·ΔW). With weight 1 this is PEFT's forward exactly; for a single
    adapter it is the usual LoRA / DoRA merge. Everything is per output row, so rows are merged in chunks.
    """
    out = torch.empty(w.shape, dtype=torch.float32, device=w.device)  # validation merges on its device
    step = max(1, ROW_CHUNK_ELEMENTS // max(1, w.shape[1]))
    for r0 in range(0, w.shape[0], step):
        rows = slice(r0, r0 + step)
        chunk = [(d[rows], None if m is None else m[rows], wt) for d, m, wt in contributions]
        out[rows] = _merge_rows(w[rows], chunk)
    return out


def _merge_rows(w: torch.Tensor, contributions) -> torch.Tensor:
    w64 = w.double()
    out = w64.clone()
    for delta, magnitude, weight in contributions:
        d64 = delta.double()
        if magnitude is None:
            out += weight * d64
        else:
            f = (magnitude.double() / torch.linalg.norm(w64 + d64, dim=1))[:, None]  # [rows, 1]
            out += weight * ((f - 1) * out + f * d64)
    return out.float()
