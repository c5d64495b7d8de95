"""QTensor ⇄ com.microsoft MatMulNBits initializers, without requantizing.

MatMulNBits (onnxruntime contrib op) dequantizes B[n, k] = (code - zero) * scale block-wise along K, with
a power-of-two block_size >= 16, codes packed low-nibble-first, optional packed uint8 zero points
(default 2**(bits-1), which is exactly the qform's symmetric convention), and scales in the activation dtype.

A qform group maps onto one or more whole blocks: block_size is the largest power of two (<= 256) dividing
the group size, and each block repeats its group's scale/zero. Per-channel (group_size=-1) repeats the row's
scale over every block. Codes are copied bit for bit; only their container changes. A K that is not a multiple of
block_size (a ragged last group, e.g. an MLP width of 1376 at group 128) is given in the K attribute, and the last
block's missing columns hold its zero point, which dequantizes to exactly 0. Symmetric scales may be negative
(quant/rtn.py's signed grid); MatMulNBits multiplies by them as they are.

Act-order (g_idx): MatMulNBits' g_idx input is deprecated (onnxruntime ContribOperators: "This input is
deprecated"), so columns are sorted by group (qform.act_order_perm) in B, and the graph gathers the
activation columns in the same order before the MatMulNBits. This is exact: it reorders a sum's terms.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lorafast_export.errors import UnsupportedError
from lorafast_export.qform import QTensor, act_order_perm, group_index, zero_points

MAX_BLOCK = 256
PER_CHANNEL_BLOCK = 128


@dataclass
class NBitsWeight:
    """The initializers of one MatMulNBits node (numpy, ready to write) and its attributes."""

    B: np.ndarray  # uint8 [N, k_blocks, block_size * bits / 8]
    scales: np.ndarray  # [N, k_blocks] in the activation dtype
    zero_points: np.ndarray | None  # uint8 [N, ceil(k_blocks * bits / 8)] packed; None = 2**(bits-1)
    perm: np.ndarray | None  # int64 [K]: activation columns to gather first (act-order); None = identity
    bits: int
    block_size: int
    K: int
    N: int


def block_size_for(qt: QTensor, where: str) -> int:
    """The MatMulNBits block size that tiles qt's groups exactly."""
    if qt.group_size == -1:
        return min(PER_CHANNEL_BLOCK, max(16, 1 << (qt.in_features - 1).bit_length()))
    block = qt.group_size & -qt.group_size  # largest power of two dividing the group size
    if block < 16:
        raise UnsupportedError(
            f"{where}: group_size={qt.group_size} cannot be expressed by onnxruntime MatMulNBits, whose "
            "blocks are powers of two >= 16 and must tile each group. Quantize with a group size that is a "
            "multiple of 16 (e.g. 32, 64, 128) or per channel (-1)."
        )
    return min(block, MAX_BLOCK)


def _pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """uint8 [..., k] → uint8 [..., k * bits / 8], low nibble first for 4 bits."""
    if bits == 8:
        return codes
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def _unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    if bits == 8:
        return packed
    return np.stack([packed & 0xF, packed >> 4], axis=-1).reshape(*packed.shape[:-1], -1)


def _block_groups(
    qt: QTensor, block: int, k_blocks: int, perm: torch.Tensor | None, where: str
) -> torch.Tensor:
    """[k_blocks] int64: the qform group of every block (checking each block lies inside one group)."""
    g = group_index(qt.in_features, qt.group_size, qt.g_idx)  # [K]
    if perm is not None:
        g = g[perm]
    padded = torch.cat([g, g[-1:].expand(k_blocks * block - g.numel())]).view(k_blocks, block)
    if not bool((padded == padded[:, :1]).all()):
        raise UnsupportedError(
            f"{where}: its act-order groups are not all of size group_size={qt.group_size}, so they cannot be "
            "laid out as MatMulNBits blocks. Re-quantize without act-order (desc_act=False)."
        )
    return padded[:, 0]


def pack_matmulnbits(qt: QTensor, scale_dtype: np.dtype, where: str) -> NBitsWeight:
    """QTensor → MatMulNBits initializers holding exactly its codes, scales and zero points."""
    K, N, bits = qt.in_features, qt.out_features, qt.bits
    block = block_size_for(qt, where)
    k_blocks = -(-K // block)
    perm = act_order_perm(qt) if qt.g_idx is not None else None
    if perm is not None and bool((perm == torch.arange(K)).all()):
        perm = None  # g_idx in natural order: nothing to gather
    groups = _block_groups(qt, block, k_blocks, perm, where)
    codes = (qt.codes if perm is None else qt.codes[:, perm]).numpy()
    codes = _pad_last_block(codes, zero_points(qt)[:, groups[-1]].numpy(), k_blocks * block - K)
    codes = codes.reshape(N, k_blocks, block)
    zeros = None
    if qt.zeros is not None:
        z = qt.zeros[:, groups].numpy()  # [N, k_blocks]
        zeros = _pack(np.pad(z, ((0, 0), (0, k_blocks % 2))) if bits == 4 else z, bits)
    return NBitsWeight(
        B=_pack(codes, bits),
        scales=qt.scales[:, groups].float().numpy().astype(scale_dtype),
        zero_points=zeros,
        perm=None if perm is None else perm.numpy().astype(np.int64),
        bits=bits,
        block_size=block,
        K=K,
        N=N,
    )


def _pad_last_block(codes: np.ndarray, zero: np.ndarray, pad: int) -> np.ndarray:
    """codes [N, K] → [N, K + pad]: a ragged last block filled with its zero point [N], so the padding dequantizes
    to exactly 0 whether or not a kernel reads past K (the activations have only K columns either way)."""
    if not pad:
        return codes
    return np.concatenate([codes, np.repeat(zero[:, None], pad, axis=1).astype(codes.dtype)], axis=1)


def unpack_codes(B: np.ndarray, bits: int, K: int, perm: np.ndarray | None = None) -> np.ndarray:
    """Inverse of the packing: uint8 codes [N, K] in the ORIGINAL column order."""
    codes = _unpack(B, bits).reshape(B.shape[0], -1)[:, :K]
    if perm is None:
        return codes
    out = np.empty_like(codes)
    out[:, perm] = codes
    return out


def unpack_zero_points(zp: np.ndarray, bits: int, k_blocks: int) -> np.ndarray:
    """Packed zero points → uint8 [N, k_blocks] (one per block)."""
    return _unpack(zp, bits)[:, :k_blocks]
