"""GPTQ checkpoint layout (AutoGPTQ / GPTQModel, as transformers loads it through gptqmodel).

Per linear `{name}.`: qweight int32 [in·bits/32, out] (codes packed along the INPUT dim, column k·pf+i
at bits [i·bits, (i+1)·bits) of row k), qzeros int32 [n_groups, out·bits/32] (packed along the output
dim), scales float16 [n_groups, out], g_idx int32 [in], bias float16 [out] (optional).
Layout defined by GPTQModel gptqmodel/nn_modules/qlinear/__init__.py `PackableQuantLinear.pack_block`
(qweight / qzeros packing) and `dequantize_weight` (unpack), identical to AutoGPTQ's `QuantLinear.pack`.

Zero points: "gptq" (v1) stores zero - 1, "gptq_v2" stores zero. We apply the v1 offset as GPTQModel's
`convert_gptq_v2_to_v1_format_module` does (subtract 0x11111111 / 0x01010101 from each packed word) and
undo it as `convert_gptq_v1_to_v2_format_module` does, so the round trip is exact for every zero point.
Caveat of v1 itself: a zero point of 0 borrows from its neighbour nibble; per-nibble readers (vLLM's
exllama GPTQ kernel) then misread that pair; symmetric layers (zero 2**(bits-1)) are never affected.
"""

from __future__ import annotations

from typing import Any

import torch

from lorafast_export.errors import InputError
from lorafast_export.qform import QScheme, QTensor, group_index, n_groups_for, qtensor_to, zero_points
from lorafast_export.quant.formats.common import cast_scales, require
from lorafast_export.quant.formats.packing import pack_int32, to_int32_words, unpack_int32

GPTQ_CHECKPOINT_FORMATS = ("gptq", "gptq_v2")
_V1_OFFSET = {4: 0x11111111, 8: 0x01010101}


def pack_gptq(
    qt: QTensor, checkpoint_format: str = "gptq", allow_scale_rounding: bool = False
) -> dict[str, torch.Tensor]:
    """QTensor → {"qweight", "qzeros", "scales", "g_idx"[, "bias"]}; prefix the keys with the module name."""
    qt = qtensor_to(qt, "cpu")  # checkpoints are written from CPU
    _check_format(checkpoint_format)
    pf = 32 // qt.bits
    require(
        qt,
        "GPTQ",
        in_features=(qt.in_features % pf == 0, f"must be a multiple of {pf}; keep this layer unquantized"),
        out_features=(qt.out_features % pf == 0, f"must be a multiple of {pf}; keep this layer unquantized"),
        act_quant=(qt.act_quant is None, "GPTQ is weight-only; export W8A8 as compressed-tensors"),
    )
    qweight = pack_int32(qt.codes.T, qt.bits, dim=0)  # [in/pf, out]
    packed_zeros = pack_int32(zero_points(qt).T, qt.bits, dim=1)  # [G, out/pf]
    if checkpoint_format == "gptq":
        packed_zeros = to_int32_words(packed_zeros.to(torch.int64) - _V1_OFFSET[qt.bits])
    tensors = {
        "qweight": qweight,
        "qzeros": packed_zeros,
        "scales": cast_scales(qt.scales.T, torch.float16, allow_scale_rounding, "GPTQ"),  # [G, out]
        "g_idx": group_index(qt.in_features, qt.group_size, qt.g_idx).to(torch.int32),  # [in]
    }
    if qt.bias is not None:
        tensors["bias"] = qt.bias.to(torch.float16)
    return tensors


def unpack_gptq(
    tensors: dict[str, torch.Tensor], bits: int, group_size: int, sym: bool, checkpoint_format: str = "gptq"
) -> QTensor:
    """Inverse of pack_gptq; bits/group_size/sym come from the checkpoint's quantization_config."""
    _check_format(checkpoint_format)
    codes = unpack_int32(tensors["qweight"], bits, dim=0).T.to(torch.uint8).contiguous()  # [out, in]
    out, in_ = codes.shape
    words = tensors["qzeros"]
    if checkpoint_format == "gptq":
        words = to_int32_words(words.to(torch.int64) + _V1_OFFSET[bits])
    zeros = unpack_int32(words, bits, dim=1).T.to(torch.uint8).contiguous()  # [out, G]
    if zeros.shape != (out, n_groups_for(in_, group_size)):
        raise InputError(
            f"GPTQ tensors: qzeros give {zeros.shape[1]} groups, but in_features={in_} and "
            f"group_size={group_size} need {n_groups_for(in_, group_size)}; the config does not "
            "match the tensors."
        )
    if sym:
        if not bool((zeros == 2 ** (bits - 1)).all()):
            raise InputError(
                f"GPTQ tensors: the config says sym=true but zero points differ from "
                f"{2 ** (bits - 1)}; set sym=false in quantization_config."
            )
        zeros = None
    g_idx = tensors["g_idx"].to(torch.int32)
    trivial = torch.equal(g_idx.long(), group_index(in_, group_size))
    return QTensor(
        codes=codes,
        scales=tensors["scales"].T.contiguous(),
        zeros=zeros,
        bits=bits,
        group_size=group_size,
        g_idx=None if trivial or group_size == -1 else g_idx,
        bias=tensors.get("bias"),
    )


def gptq_quant_config(
    scheme: QScheme,
    checkpoint_format: str = "gptq",
    damp_percent: float = 0.01,
    true_sequential: bool = True,
) -> dict[str, Any]:
    """The `quantization_config` of config.json (transformers GPTQConfig / GPTQModel QuantizeConfig)."""
    _check_format(checkpoint_format)
    if scheme.act_quant is not None:
        raise InputError("GPTQ checkpoints are weight-only; export W8A8 as compressed-tensors.")
    return {
        "quant_method": "gptq",
        "bits": scheme.bits,
        "group_size": scheme.group_size,
        "desc_act": scheme.act_order,
        "sym": scheme.symmetric,
        "checkpoint_format": checkpoint_format,
        "damp_percent": damp_percent,
        "true_sequential": true_sequential,  # how the layer was walked (quant/config.py; informational)
        "static_groups": False,
        "pack_dtype": "int32",
    }


def _check_format(checkpoint_format: str) -> None:
    if checkpoint_format not in GPTQ_CHECKPOINT_FORMATS:
        raise InputError(
            f"GPTQ checkpoint_format={checkpoint_format!r}: use one of {GPTQ_CHECKPOINT_FORMATS}."
        )
