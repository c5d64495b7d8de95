"""Adapter merge math: pure tensor functions, fp32 inside, no model or file knowledge.

Definitions follow PEFT 0.21 (peft/tuners/lora/layer.py and dora.py):
  LoRA:   W' = W + s * B @ A,   s = alpha / r   (rsLoRA: alpha / sqrt(r))
  DoRA:   W' = (m / ||W + s * B @ A||_row) [:, None] * (W + s * B @ A)
  Embedding LoRA: E' = E + s * (B @ A).T   (A: [r, vocab], B: [dim, r])
Weights are stored [out, in] unless the adapter was trained with fan_in_fan_out (GPT-2 Conv1D style).
"""

from __future__ import annotations

import torch


class LowRankDelta:
    """ΔW [out, in] = s * B @ A (A [r, in], B [out, r]), or its transpose (fan_in_fan_out; an embedding LoRA,
    whose ΔE = s * (B @ A).T), as float32 values of an fp64 product, so the merge adds no error of its own.
    `rows(sl)` computes only those rows: the merge works a few rows at a time, and the whole fp64 product
    (2.2 GB for one 13B MLP weight) never exists."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor, scaling: float, transposed: bool = False):
        self.a, self.b, self.scaling, self.transposed = a.double(), b.double(), scaling, transposed
        n_out = self.a.shape[1] if transposed else self.b.shape[0]
        n_in = self.b.shape[0] if transposed else self.a.shape[1]
        self.shape = (n_out, n_in)

    def rows(self, sl: slice) -> torch.Tensor:
        if self.transposed:
            return (self.b @ self.a[:, sl]).mul_(self.scaling).T.float()
        return (self.b[sl] @ self.a).mul_(self.scaling).float()

    def full(self) -> torch.Tensor:
        return self.rows(slice(None))


def lora_delta(
    a: torch.Tensor, b: torch.Tensor, scaling: float, fan_in_fan_out: bool = False
) -> LowRankDelta:
    """ΔW [out, in] from A [r, in] and B [out, r] (transposed back when fan_in_fan_out)."""
    return LowRankDelta(a, b, scaling, transposed=fan_in_fan_out)


def embedding_delta(a: torch.Tensor, b: torch.Tensor, scaling: float) -> LowRankDelta:
    """ΔE [vocab, dim] from lora_embedding_A [r, vocab] and lora_embedding_B [dim, r]."""
    return LowRankDelta(a, b, scaling, transposed=True)


# Rows are merged in chunks of about this many elements. On a CPU a chunk's fp64 temporaries (~1 MiB each) stay in
# the core's cache: a 13B MLP weight (13824 x 5120) merged in 1.25 s against 4.3 s with whole-matrix passes
# (the delta's fp64 product, then 4M-element chunks), identical values. On a GPU fewer, larger chunks (launches:
# the greedy check merges every layer again at each token; 16M elements = 128 MiB fp64 temporaries, an 8B MLP
# weight in 4 chunks instead of 14).
ROW_CHUNK_ELEMENTS = {"cpu": 1 << 18, "cuda": 1 << 24}


def merge_linear(
    w: torch.Tensor, contributions: list[tuple[LowRankDelta | torch.Tensor, torch.Tensor | None, float]]
) -> torch.Tensor:
    """Merge adapters [(ΔW, DoRA magnitude or None, weight)] into w [out, in] (any float dtype), in order;
    returns fp32.

    Several adapters apply in the given order, as PEFT computes with several active adapters: a LoRA adds
    weight·ΔW; a DoRA with factor f = m / ||W_base + ΔW|| (norm of the BASE weight plus its own delta) turns the
    accumulated W into  W + weight·((f − 1)·W + f·ΔW). With weight 1 this is PEFT's forward exactly; for a single
    adapter it is the usual LoRA / DoRA merge. Everything is per output row, so rows are merged in chunks.
    """
    out = torch.empty(w.shape, dtype=torch.float32, device=w.device)  # validation merges on its device
    budget = ROW_CHUNK_ELEMENTS["cuda" if w.device.type == "cuda" else "cpu"]
    step = max(1, budget // max(1, w.shape[1]))
    for r0 in range(0, w.shape[0], step):
        rows = slice(r0, r0 + step)
        chunk = [
            (d.rows(rows) if isinstance(d, LowRankDelta) else d[rows], None if m is None else m[rows], wt)
            for d, m, wt in contributions
        ]
        out[rows] = _merge_rows(w[rows], chunk)
    return out


def _merge_rows(w: torch.Tensor, contributions) -> torch.Tensor:
    out = w.to(torch.float64, copy=True)
    w64 = out.clone() if any(m is not None for _, m, _ in contributions) else None  # DoRA: the base's norm
    for delta, magnitude, weight in contributions:
        d64 = delta.double()
        if magnitude is None:
            out += d64 if weight == 1 else weight * d64  # 1 * x == x: one pass fewer, the same values
        else:
            f = (magnitude.double() / torch.linalg.norm(w64 + d64, dim=1))[:, None]  # [rows, 1]
            out += weight * ((f - 1) * out + f * d64)
    return out.float()
