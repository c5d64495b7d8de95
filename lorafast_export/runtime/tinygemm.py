"""torch's tinygemm int4 kernels (`aten._weight_int4pack_mm`, CUDA with bf16 activations, and its CPU twin):
the packing of our codes for them and the call. Used by runtime/linear.py and, for the row buckets where the
measured table gives tinygemm, inside runtime/triton_int4.py's op."""

from __future__ import annotations

import torch

from lorafast_export.qform import QTensor

INNER_K_TILES = 8


def pack_int4(codes: torch.Tensor, device) -> torch.Tensor:
    """codes uint8 [out, in] (values 0..15) → the tinygemm layout of the device."""
    if torch.device(device).type == "cuda":
        c = codes.to(device=device, dtype=torch.uint8)  # packed on the device, in bytes (codes < 16)
        return torch.ops.aten._convert_weight_to_int4pack(c[:, ::2] << 4 | c[:, 1::2], INNER_K_TILES)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), INNER_K_TILES)


def tinygemm_pack(qt: QTensor, codes: torch.Tensor, dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed weight, scale_zeros [G, out, 2]) of the device's tinygemm layout; codes: act-order permuted."""
    scales = qt.scales.to(codes.device).float()  # [out, G], on the codes' device
    zeros = (
        (8.0 - qt.zeros.to(codes.device).float()) * scales
        if qt.zeros is not None
        else torch.zeros_like(scales)
    )
    sz = torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous()  # [G, out, 2]
    return pack_int4(codes, device), sz.to(device=device, dtype=dtype)


def tinygemm_mm(x: torch.Tensor, weight: torch.Tensor, group_size: int, scale_zeros: torch.Tensor):
    mm = torch.ops.aten._weight_int4pack_mm if x.is_cuda else torch.ops.aten._weight_int4pack_mm_for_cpu
    return mm(x, weight, group_size, scale_zeros)
