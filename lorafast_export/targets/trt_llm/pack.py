"""Tensor math of the TensorRT-LLM / ModelOpt weight layouts (pure functions, no file I/O).

What the layouts mean (the reader's semantics; sources in lorafast_export/targets/trt_llm/target.py's docstring):

- W8A16 ("int8_wo"): `weight` int8 [out, in], `weight_scale` float32 [out];  w = int8 · scale[o].
- W4A16_AWQ ("int4_awq"): `weight` [out/2, in] (uint8 in the HF export, int8 in the engine checkpoint), two
  signed int4 values per byte packed along the OUTPUT dim: byte[r, c] = (w4[2r, c] & 0xF) | (w4[2r+1, c] << 4)
  (ModelOpt `pack_int4_in_uint8`); `weight_scale` float32 [out, in/group];  w = int4 · scale[o, c // group];
  `pre_quant_scale` [in] multiplies the INPUT:  y = (x · pqs) Wᵀ, i.e. an effective weight w · pqs[c].
- Our QTensor codes are unsigned with an implicit zero 2**(bits-1) when symmetric, so the signed value the
  kernels take is codes - 2**(bits-1): int8 codes → [-128, 127], int4 → [-8, 7]. Nothing is re-rounded.
"""

from __future__ import annotations

import torch

from lorafast_export.qform import QTensor


def signed_codes(qt: QTensor) -> torch.Tensor:
    """Symmetric QTensor → int8 [out, in] holding the signed integer weights (codes - 2**(bits-1))."""
    return (qt.codes.to(torch.int16) - 2 ** (qt.bits - 1)).to(torch.int8)


def pack_int4_rows(w4: torch.Tensor) -> torch.Tensor:
    """Signed int4 values as int8 [out, in] (out even) → uint8 [out/2, in], pairs of rows per byte, low first."""
    lo = w4[0::2].to(torch.int16) & 0xF  # [out/2, in]
    hi = w4[1::2].to(torch.int16) & 0xF
    return (lo | (hi << 4)).to(torch.uint8)


def unpack_int4_rows(packed: torch.Tensor) -> torch.Tensor:
    """uint8 or int8 [out/2, in] → int8 [out, in] signed int4 values (inverse of pack_int4_rows)."""
    b = packed.view(torch.uint8).to(torch.int16)
    lo, hi = b & 0xF, (b >> 4) & 0xF
    both = torch.stack([lo, hi], dim=1).reshape(-1, packed.shape[1])  # rows 2r, 2r+1 interleaved back
    return torch.where(both >= 8, both - 16, both).to(torch.int8)


def dequant_int8_rows(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """W8A16: int8 [out, in] · scale [out] → float32 [out, in]."""
    return weight.float() * scale.float()[:, None]


def dequant_int4_groups(w4: torch.Tensor, scale: torch.Tensor, group_size: int) -> torch.Tensor:
    """W4A16: signed int4 values [out, in] · scale [out, in/group] (per input group) → float32 [out, in]."""
    g = torch.arange(w4.shape[1]) // group_size
    return w4.float() * scale.float()[:, g]


def split_dim(t: torch.Tensor, parts: int, dim: int) -> list[torch.Tensor]:
    """Equal contiguous chunks along dim (the caller checked divisibility)."""
    return [c.contiguous() for c in torch.chunk(t, parts, dim=dim)]


def pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """t [n, ...] → [rows, ...] with zero rows appended (vocab padding of embeddings and lm_head)."""
    if t.shape[0] == rows:
        return t
    pad = torch.zeros((rows - t.shape[0], *t.shape[1:]), dtype=t.dtype)
    return torch.cat([t, pad], dim=0)


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple
