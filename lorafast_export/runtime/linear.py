"""Low-bit linears built from the quantized form's codes (repacked for a kernel, never requantized).

Kernels, chosen per layer by `choose_kernel` (bench/TORCH.md has the measurements behind "auto"):
- int4, group size 32/64/128/256: torch's tinygemm, `aten._weight_int4pack_mm` (CUDA, bf16 activations;
  1.4x faster than bf16 at 1 row for the 8B MLP shapes, but 1.2-3x slower at 8-32 rows) or
  `aten._weight_int4pack_mm_for_cpu`. Tinygemm computes w = (q - 8) * scale + zero with a float zero per
  group, so our integer zero point z becomes zero = (8 - z) * scale (0 when symmetric). Act-order columns
  are permuted into contiguous groups, and the activations with them.
- int8 per channel, CPU: `aten._weight_int8pack_mm` (w = int8 * scale per row). Codes are unsigned, so
  int8 = code - 128 and an asymmetric zero point adds a per-row term (128 - z) * scale * sum(x). Not on
  CUDA: there it ran 7x (1 row) to 90x (32 rows) slower than the dense bf16 matmul, so int8 uses dequant.
- anything else (int8 grouped, odd shapes, fp32 activations on CUDA int4): `DequantLinear`, the
  dequantized weight kept dense in the compute dtype: exact, no memory saving.
SmoothQuant W8A8 (act_quant) quantize-dequantizes activations per token first, exactly as qform.QLinear
does; the matmul itself is weight-only (no int8 x int8 kernel here yet).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorafast_export.qform import (
    ACT_QUANT_INT8_PER_TOKEN,
    QTensor,
    act_order_perm,
    dequantize,
    fake_quant_int8_per_token,
    group_index,
)

TINYGEMM_GROUPS = (32, 64, 128, 256)
INNER_K_TILES = 8
KERNELS = ("auto", "dequant")


def _contiguous_groups(qt: QTensor) -> torch.Tensor | None:
    """Column permutation making groups contiguous and exactly group_size wide; None when already so."""
    if qt.g_idx is None:
        return None
    perm = act_order_perm(qt)
    groups = group_index(qt.in_features, qt.group_size, qt.g_idx)[perm]
    expected = torch.arange(qt.in_features) // qt.group_size
    if not torch.equal(groups, expected):
        raise ValueError("act-order groups are not group_size wide")
    return perm


def choose_kernel(qt: QTensor, device: torch.device | str, dtype: torch.dtype, prefer: str = "auto") -> str:
    """'int4_tinygemm' | 'int8_weight_only' | 'dequant' for this tensor on this device/dtype."""
    if prefer == "dequant":
        return "dequant"
    cuda = torch.device(device).type == "cuda"
    out_f, in_f = qt.out_features, qt.in_features
    if qt.bits == 8 and (qt.group_size == -1 or qt.group_size >= in_f) and not cuda:
        return "int8_weight_only"  # on CUDA (torch 2.11, H200) _weight_int8pack_mm was 7-90x slower than bf16
    if (
        qt.bits == 4
        and qt.group_size in TINYGEMM_GROUPS
        and in_f % qt.group_size == 0
        and in_f % (INNER_K_TILES * 16) == 0
        and out_f % 8 == 0
        and (not cuda or dtype == torch.bfloat16)
    ):
        try:
            _contiguous_groups(qt)
        except ValueError:
            return "dequant"
        return "int4_tinygemm"
    return "dequant"


class _QuantLinearBase(nn.Module):
    def __init__(self, qt: QTensor, bias: torch.Tensor | None, dtype: torch.dtype, device):
        super().__init__()
        self.in_features, self.out_features = qt.in_features, qt.out_features
        self.act_quant = qt.act_quant
        b = qt.bias if qt.bias is not None else bias
        self.register_buffer("bias", None if b is None else b.to(device=device, dtype=dtype))

    def _prep(self, x: torch.Tensor) -> torch.Tensor:
        return fake_quant_int8_per_token(x) if self.act_quant == ACT_QUANT_INT8_PER_TOKEN else x

    def _finish(self, y: torch.Tensor, shape) -> torch.Tensor:
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)


class DequantLinear(_QuantLinearBase):
    """Fallback: the dequantized weight, dense in the compute dtype (equals qform.QLinear exactly)."""

    kernel = "dequant"

    def __init__(self, qt: QTensor, bias=None, dtype=torch.float32, device="cpu"):
        super().__init__(qt, bias, dtype, device)
        self.register_buffer("weight", dequantize(qt).to(device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self._prep(x), self.weight, self.bias)


class Int8Linear(_QuantLinearBase):
    """Per-channel int8 weight-only through aten._weight_int8pack_mm."""

    kernel = "int8_weight_only"

    def __init__(self, qt: QTensor, bias=None, dtype=torch.float32, device="cpu"):
        super().__init__(qt, bias, dtype, device)
        scale = qt.scales[:, 0].float()  # [out]
        self.register_buffer(
            "weight", (qt.codes.to(torch.int16) - 128).to(torch.int8).to(device)
        )  # [out, in]
        self.register_buffer("scales", scale.to(device=device, dtype=dtype))
        zcorr = None if qt.zeros is None else (128.0 - qt.zeros[:, 0].float()) * scale  # [out]
        self.register_buffer("zero_term", None if zcorr is None else zcorr.to(device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, x = x.shape, self._prep(x).reshape(-1, self.in_features)
        y = torch.ops.aten._weight_int8pack_mm(x, self.weight, self.scales)
        if self.zero_term is not None:
            y = (y.float() + x.float().sum(-1, keepdim=True) * self.zero_term).to(x.dtype)
        return self._finish(y, shape)


class Int4Linear(_QuantLinearBase):
    """int4 grouped through torch's tinygemm kernels (CUDA or CPU packing, chosen at build)."""

    kernel = "int4_tinygemm"

    def __init__(self, qt: QTensor, bias=None, dtype=torch.bfloat16, device="cpu"):
        super().__init__(qt, bias, dtype, device)
        self.group_size = qt.group_size
        perm = _contiguous_groups(qt)
        codes = qt.codes if perm is None else qt.codes[:, perm]
        scales = qt.scales.float()  # [out, G]
        zeros = (8.0 - qt.zeros.float()) * scales if qt.zeros is not None else torch.zeros_like(scales)
        sz = torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous()  # [G, out, 2]
        self.register_buffer("scale_zeros", sz.to(device=device, dtype=dtype))
        self.register_buffer("perm", None if perm is None else perm.to(device))
        self.on_cuda = torch.device(device).type == "cuda"
        self.register_buffer("weight", pack_int4(codes, device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, x = x.shape, self._prep(x).reshape(-1, self.in_features)
        if self.perm is not None:
            x = x[:, self.perm]
        mm = (
            torch.ops.aten._weight_int4pack_mm if self.on_cuda else torch.ops.aten._weight_int4pack_mm_for_cpu
        )
        return self._finish(mm(x, self.weight, self.group_size, self.scale_zeros), shape)


def pack_int4(codes: torch.Tensor, device) -> torch.Tensor:
    """codes uint8 [out, in] (values 0..15) → the tinygemm layout of the device."""
    if torch.device(device).type == "cuda":
        c = codes.to(device=device, dtype=torch.int32)
        return torch.ops.aten._convert_weight_to_int4pack(
            (c[:, ::2] << 4 | c[:, 1::2]).to(torch.uint8), INNER_K_TILES
        )
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), INNER_K_TILES)


_KERNEL_CLASSES = {"int4_tinygemm": Int4Linear, "int8_weight_only": Int8Linear, "dequant": DequantLinear}


def lower_qtensor(
    qt: QTensor, device, dtype: torch.dtype, prefer: str = "auto", bias: torch.Tensor | None = None
) -> nn.Module:
    """The runtime linear for one QTensor: the fastest kernel that supports it (see module doc)."""
    return _KERNEL_CLASSES[choose_kernel(qt, device, dtype, prefer)](
        qt, bias=bias, dtype=dtype, device=device
    )
