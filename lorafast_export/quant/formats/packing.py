"""Bit-packing of small unsigned integers into int32 words, the primitive of every checkpoint layout."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lorafast_export.errors import InputError

_U32 = 1 << 32


def to_int32_words(words: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2**32) (or any int64, taken modulo 2**32) → the same bits as int32."""
    words = words.to(torch.int64) & (_U32 - 1)
    return torch.where(words >= 1 << 31, words - _U32, words).to(torch.int32)


def pack_int32(values: torch.Tensor, bits: int, dim: int, order: Sequence[int] | None = None) -> torch.Tensor:
    """Pack unsigned `bits`-bit values 32//bits to an int32 word along `dim`.

    Word k holds values k·pf + order[i] at bit offset i·bits (order = identity unless given;
    AWQ uses [0, 2, 4, 6, 1, 3, 5, 7]). The size along dim must be a multiple of pf = 32 // bits.
    """
    pf = 32 // bits
    v = values.to(torch.int64).movedim(dim, -1)  # [..., n]
    n = v.shape[-1]
    if n % pf:
        raise InputError(
            f"cannot pack {n} values of {bits} bits into int32 words: {n} is not a multiple of "
            f"{pf}; the layer shape does not fit this checkpoint format."
        )
    v = v.reshape(*v.shape[:-1], n // pf, pf)  # [..., words, pf]
    if order is not None:
        v = v[..., list(order)]
    shifts = torch.arange(pf, dtype=torch.int64, device=v.device) * bits
    words = (v << shifts).sum(dim=-1)  # [..., words]
    return to_int32_words(words).movedim(-1, dim).contiguous()


def unpack_int32(
    words: torch.Tensor, bits: int, dim: int, order: Sequence[int] | None = None
) -> torch.Tensor:
    """Inverse of pack_int32 → int64 values with 32//bits times the size along `dim`."""
    pf = 32 // bits
    w = words.to(torch.int64).movedim(dim, -1) & (_U32 - 1)  # [..., words]
    shifts = torch.arange(pf, dtype=torch.int64, device=w.device) * bits
    v = (w[..., None] >> shifts) & ((1 << bits) - 1)  # [..., words, pf]; slot i holds value order[i]
    if order is not None:
        v = v[..., torch.argsort(torch.tensor(list(order)))]
    return v.reshape(*v.shape[:-2], -1).movedim(-1, dim).contiguous()
