"""Toy layers and random QTensors for the quantization tests."""

from __future__ import annotations

import copy

import torch

from lorafast_export.model.decoder import DecoderLayer, causal_mask
from lorafast_export.qform import QTensor, n_groups_for
from lorafast_export.quant.blocks import LAYER_GROUPS, Block


def random_qtensor(
    out: int,
    in_: int,
    bits: int,
    group_size: int,
    symmetric: bool,
    act_order: bool = False,
    seed: int = 0,
    scale_dtype: torch.dtype = torch.float16,
    bias: bool = False,
) -> QTensor:
    """A QTensor with every code and zero value in range (code 0, signed -2**(bits-1), included), fp16-exact
    scales, optional act-order g_idx. Symmetric scales take both signs, as the signed grid makes them (quant/rtn.py):
    every packer must carry a negative scale through unchanged."""
    g = torch.Generator().manual_seed(seed)
    n_groups = n_groups_for(in_, group_size)
    codes = torch.randint(0, 2**bits, (out, in_), generator=g).to(torch.uint8)
    codes[:, 0] = 0  # the lowest code is always present
    scales = torch.rand(out, n_groups, generator=g) * 0.02 + 1e-3
    if symmetric:
        scales = torch.where(torch.rand(out, n_groups, generator=g) < 0.5, -scales, scales)
        scales[0, 0] = -scales[0, 0].abs()  # at least one negative scale whatever the seed
    scales = scales.to(scale_dtype)
    zeros = None if symmetric else torch.randint(0, 2**bits, (out, n_groups), generator=g).to(torch.uint8)
    g_idx = None
    if act_order and group_size != -1:
        perm = torch.randperm(in_, generator=g)
        g_idx = (torch.argsort(perm) // group_size).to(torch.int32)
    b = torch.randn(out, generator=g).to(torch.float16) if bias else None
    return QTensor(
        codes=codes, scales=scales, zeros=zeros, bits=bits, group_size=group_size, g_idx=g_idx, bias=b
    )


def correlated_inputs(tokens: int, in_: int, seed: int = 0, outlier_channels: int = 0) -> torch.Tensor:
    """x [tokens, in]: correlated channels (low rank + noise), optionally a few large-magnitude channels."""
    g = torch.Generator().manual_seed(seed)
    rank = max(2, in_ // 8)
    x = torch.randn(tokens, rank, generator=g) @ torch.randn(rank, in_, generator=g)
    x = x + 0.1 * torch.randn(tokens, in_, generator=g)
    if outlier_channels:
        idx = torch.randperm(in_, generator=g)[:outlier_channels]
        x[:, idx] *= 30.0
    return x


def assert_same_qtensor(a: QTensor, b: QTensor) -> None:
    """Field-by-field bitwise equality (dtype included)."""
    assert (a.bits, a.group_size, a.act_quant) == (b.bits, b.group_size, b.act_quant)
    for name in ("codes", "scales", "zeros", "g_idx", "bias", "input_scale"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert x.dtype == y.dtype, (name, x.dtype, y.dtype)
            assert torch.equal(x, y), name


def make_block(layer: DecoderLayer, x: torch.Tensor, cfg_rotary) -> Block:
    """A quantization Block over a copy of one decoder layer with calibration input x [batch, seq, hidden] and
    rope's (cos, sin) at positions 0.. (cfg_rotary), causal, 4 rows a chunk."""
    cos, sin = cfg_rotary
    mask = causal_mask(x.shape[1], 0, "cpu")
    return Block(
        copy.deepcopy(layer),
        LAYER_GROUPS,
        x,
        lambda m, xc: m(xc, cos, sin, mask)[0],
        sub_args={"self_attn": (cos, sin, mask, None)},
        chunk=4,
    )
