"""AWQ "GEMM" checkpoint layout (AutoAWQ, as transformers' AwqConfig(version="gemm") loads it).

Per linear `{name}.`: qweight int32 [in, out/8] (codes packed along the OUTPUT dim in the interleaved
order [0, 2, 4, 6, 1, 3, 5, 7]: slot i of word k holds output column 8k + order[i]), qzeros int32
[n_groups, out/8] (same packing, zero points stored as-is, no "minus one"), scales float16 [n_groups, out],
bias float16 [out] (optional). 4-bit only, contiguous groups only (no act-order).
Layout defined by AutoAWQ awq/modules/linear/gemm.py `WQLinear_GEMM.from_linear` (pack) and
awq/utils/packing_utils.py `unpack_awq` + `reverse_awq_order` (unpack).
The GEMM kernels always subtract a zero point, so symmetric layers are written with their implicit zero
2**(bits-1) made explicit (zero_point=true) and come back with explicit zeros.
"""

from __future__ import annotations

from typing import Any

import torch

from lorafast_export.errors import InputError
from lorafast_export.qform import QScheme, QTensor, qtensor_to, zero_points
from lorafast_export.quant.formats.common import cast_scales, require
from lorafast_export.quant.formats.packing import pack_int32, unpack_int32

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def pack_awq(qt: QTensor, allow_scale_rounding: bool = False) -> dict[str, torch.Tensor]:
    """QTensor → {"qweight", "qzeros", "scales"[, "bias"]} (prefix the keys with the module name)."""
    qt = qtensor_to(qt, "cpu")  # checkpoints are written from CPU
    gs = qt.group_size
    require(
        qt,
        "AWQ GEMM",
        bits=(qt.bits == 4, "AWQ GEMM stores 4-bit weights only; use GPTQ or compressed-tensors for 8-bit"),
        group_size=(
            gs != -1 and qt.in_features % gs == 0,
            "needs whole groups (group_size dividing in_features, not -1), e.g. 128",
        ),
        out_features=(qt.out_features % 8 == 0, "must be a multiple of 8; keep this layer unquantized"),
        g_idx=(qt.g_idx is None, "AWQ has no act-order; export act-order layers as GPTQ"),
        act_quant=(qt.act_quant is None, "AWQ is weight-only; export W8A8 as compressed-tensors"),
    )
    tensors = {
        "qweight": pack_int32(qt.codes.T, 4, dim=1, order=AWQ_ORDER),  # [in, out/8]
        "qzeros": pack_int32(zero_points(qt).T, 4, dim=1, order=AWQ_ORDER),  # [G, out/8]
        "scales": cast_scales(qt.scales.T, torch.float16, allow_scale_rounding, "AWQ"),  # [G, out]
    }
    if qt.bias is not None:
        tensors["bias"] = qt.bias.to(torch.float16)
    return tensors


def unpack_awq(tensors: dict[str, torch.Tensor], group_size: int, bits: int = 4) -> QTensor:
    """Inverse of pack_awq (zeros come back explicit); group_size/bits from the quantization_config."""
    if bits != 4:
        raise InputError(f"AWQ GEMM checkpoints are 4-bit, the config says bits={bits}.")
    codes = unpack_int32(tensors["qweight"], 4, dim=1, order=AWQ_ORDER).T.to(torch.uint8)  # [out, in]
    zeros = unpack_int32(tensors["qzeros"], 4, dim=1, order=AWQ_ORDER).T.to(torch.uint8)  # [out, G]
    return QTensor(
        codes=codes.contiguous(),
        scales=tensors["scales"].T.contiguous(),
        zeros=zeros.contiguous(),
        bits=4,
        group_size=group_size,
        bias=tensors.get("bias"),
    )


def awq_quant_config(scheme: QScheme, modules_to_not_convert: list[str] | None = None) -> dict[str, Any]:
    """The `quantization_config` of config.json as AutoAWQ writes it (`AwqConfig.to_transformers_dict`)."""
    if scheme.bits != 4 or scheme.act_order or scheme.act_quant is not None or scheme.group_size == -1:
        raise InputError(
            f"AWQ GEMM stores 4-bit, grouped, weight-only layers without act-order; got {scheme}."
        )
    return {
        "quant_method": "awq",
        "zero_point": True,
        "group_size": scheme.group_size,
        "bits": 4,
        "version": "gemm",
        "modules_to_not_convert": modules_to_not_convert,
    }
