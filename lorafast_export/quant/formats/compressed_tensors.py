"""compressed-tensors checkpoint layouts (llm-compressor's output; loaded by vLLM, SGLang, transformers).

"pack-quantized" (4- or 8-bit weight-only), per linear `{name}.`:
  weight_packed int32 [out, ceil(in/pf)]  codes packed along the INPUT dim, value k·pf+i at bits
                                          [i·bits, (i+1)·bits) (little-endian), zero padding at the end
  weight_scale [out, n_groups]            (float, dtype kept)
  weight_zero_point int32 [ceil(out/pf), n_groups]  asymmetric only, packed along the OUTPUT dim
  weight_shape int64 [2]                  (out, in)
  weight_g_idx int32 [in]                 act-order, compressed-tensors < 0.20 only (read back; the config
                                          refuses act-order, so exports never carry it)
compressed-tensors' signed values are q - 2**(bits-1) and it packs q_signed + 2**(bits-1): exactly our
unsigned codes and zero points. Defined by compressed-tensors compressors/quantized_compressors/
pack_quantized.py `pack_to_int32` / `unpack_from_int32` / `PackedQuantizationCompressor.compress_weight`.

"int-quantized" (8-bit; W8A8 or weight-only): weight int8 [out, in] = codes - 128, weight_scale
[out, n_groups], weight_zero_point int8 [out, n_groups] = zero - 128 (asymmetric only; symmetric zero
points are not saved). Defined by compressors/quantized_compressors/naive_quantized.py
(`IntQuantizationCompressor`) and BaseQuantizationCompressor._skip_zp.

What the config cannot say (compressed-tensors 0.20.1, checked in its source):
- act-order with a g_idx (GPTQ desc_act, our act-order): compressed-tensors < 0.20 called it actorder "group"
  and stored weight_g_idx; 0.20 removed it (QuantizationArgs rejects "group"/"dynamic"/True, and nothing reads
  weight_g_idx). Its remaining value "weight" means act-order during calibration only, groups in column order,
  i.e. no g_idx: not our act-order. So act-order models are refused (export them as GPTQ).
- W8A8 activation rounding. The config says "dynamic symmetric int8 per token", and runtimes disagree on what
  that computes. vLLM (`scaled_int8_quant`) and our IR: scale = absmax/127, codes in [-127, 127].
  compressed-tensors' own forward (what transformers runs: `forward_quantize` → `compute_dynamic_scales_and_zp`
  → `calculate_qparams`): scale = absmax / ((127 - (-128)) / 2) = absmax/127.5, codes x/scale clamped to
  [-128, 127] and rounded half-to-even (`ct_fake_quant_int8_per_token`). The int range is fixed by num_bits,
  so no setting (symmetric, strategy, observer, scale_dtype, zp_dtype) expresses absmax/127: transformers'
  logits of a W8A8 checkpoint differ from ours by that activation rounding (the weights are exact), as
  `compressed_tensors_loader_notes` says in the manifest.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from lorafast_export.errors import InputError
from lorafast_export.qform import QScheme, QTensor, qtensor_to
from lorafast_export.quant.formats.common import cast_scales, require
from lorafast_export.quant.formats.packing import pack_int32, unpack_int32

CT_FORMATS = ("pack-quantized", "int-quantized")
ACT_ORDER_REFUSAL = (
    "compressed-tensors cannot hold act-order groups (g_idx): actorder 'group' was removed in "
    "compressed-tensors 0.20 and 'weight' means groups in column order. Export act-order models "
    "as gptq, or quantize without --act-order"
)
W8A8_LOADER_NOTE = (
    "transformers (through compressed-tensors) quantizes this checkpoint's activations with scale "
    "absmax/127.5 and codes in [-128, 127]; our quantized model and vLLM use absmax/127 and "
    "[-127, 127]. The weights are bit-exact: the artifact stage's difference from stage quantized "
    "(vs previous) is that activation rounding."
)


def compressed_tensors_format(scheme: QScheme) -> str:
    """W8A8 → int-quantized (what vLLM's int8 W8A8 path reads); weight-only → pack-quantized (WNA16)."""
    return "int-quantized" if scheme.act_quant is not None else "pack-quantized"


def _pad_to(x: torch.Tensor, multiple: int, dim: int) -> torch.Tensor:
    pad = -x.shape[dim] % multiple
    if not pad:
        return x
    return F.pad(x, (0, pad) if dim == 1 else (0, 0, 0, pad))


def pack_compressed_tensors(
    qt: QTensor,
    fmt: str | None = None,
    scale_dtype: torch.dtype | None = None,
    allow_scale_rounding: bool = False,
) -> dict[str, torch.Tensor]:
    """QTensor → {"weight_packed"|"weight", "weight_scale", ...} (prefix keys with the module name)."""
    qt = qtensor_to(qt, "cpu")  # checkpoints are written from CPU
    fmt = fmt or compressed_tensors_format(qt.scheme)
    if fmt not in CT_FORMATS:
        raise InputError(f"compressed-tensors format {fmt!r}: use one of {CT_FORMATS}.")
    require(
        qt,
        f"compressed-tensors {fmt}",
        bits=(fmt == "pack-quantized" or qt.bits == 8, "int-quantized stores 8-bit only; use pack-quantized"),
    )
    scales = cast_scales(
        qt.scales, scale_dtype or qt.scales.dtype, allow_scale_rounding, "compressed-tensors"
    )
    tensors: dict[str, torch.Tensor] = {"weight_scale": scales}  # [out, G]
    if fmt == "pack-quantized":
        pf = 32 // qt.bits
        tensors["weight_packed"] = pack_int32(_pad_to(qt.codes, pf, dim=1), qt.bits, dim=1)  # [out, in/pf]
        tensors["weight_shape"] = torch.tensor(list(qt.codes.shape), dtype=torch.int64)
        if qt.zeros is not None:  # [ceil(out/pf), G]
            tensors["weight_zero_point"] = pack_int32(_pad_to(qt.zeros, pf, dim=0), qt.bits, dim=0)
    else:
        tensors["weight"] = (qt.codes.to(torch.int16) - 128).to(torch.int8)  # [out, in]
        if qt.zeros is not None:
            tensors["weight_zero_point"] = (qt.zeros.to(torch.int16) - 128).to(torch.int8)  # [out, G]
    if qt.g_idx is not None:
        tensors["weight_g_idx"] = qt.g_idx
    if qt.bias is not None:
        tensors["bias"] = qt.bias
    return tensors


def unpack_compressed_tensors(tensors: dict[str, torch.Tensor], scheme: QScheme, fmt: str) -> QTensor:
    """Inverse of pack_compressed_tensors; scheme and fmt come from the quantization_config."""
    if fmt not in CT_FORMATS:
        raise InputError(f"compressed-tensors format {fmt!r}: use one of {CT_FORMATS}.")
    bits, scales = scheme.bits, tensors["weight_scale"]
    zeros = None
    if fmt == "pack-quantized":
        out, in_ = (int(v) for v in tensors["weight_shape"])
        codes = unpack_int32(tensors["weight_packed"], bits, dim=1)[:, :in_]  # [out, in]
        if not scheme.symmetric:
            zeros = unpack_int32(tensors["weight_zero_point"], bits, dim=0)[:out].to(torch.uint8)  # [out, G]
    else:
        codes = tensors["weight"].to(torch.int16) + 128
        if not scheme.symmetric:
            zeros = (tensors["weight_zero_point"].to(torch.int16) + 128).to(torch.uint8)
    return QTensor(
        codes=codes.to(torch.uint8).contiguous(),
        scales=scales,
        zeros=zeros,
        bits=bits,
        group_size=scheme.group_size,
        g_idx=tensors.get("weight_g_idx"),
        bias=tensors.get("bias"),
        act_quant=scheme.act_quant,
    )


def _weight_args(scheme: QScheme) -> dict[str, Any]:
    if scheme.act_order:
        raise InputError(ACT_ORDER_REFUSAL)
    grouped = scheme.group_size != -1
    return {
        "num_bits": scheme.bits,
        "type": "int",
        "symmetric": scheme.symmetric,
        "strategy": "group" if grouped else "channel",
        "group_size": scheme.group_size if grouped else None,
        "dynamic": False,
        "actorder": None,
        "block_structure": None,
    }


_INT8_PER_TOKEN_ARGS = {
    "num_bits": 8,
    "type": "int",
    "symmetric": True,
    "strategy": "token",
    "group_size": None,
    "dynamic": True,
    "actorder": None,
    "block_structure": None,
}


def compressed_tensors_config(
    scheme: QScheme,
    fmt: str | None = None,
    ignore: tuple[str, ...] = ("lm_head",),
    targets: tuple[str, ...] = ("Linear",),
) -> dict[str, Any]:
    """The `quantization_config` of config.json for one scheme applied to every `targets` module.

    Refuses act-order (see the module doc). W8A8 is written as dynamic symmetric int8 per token: exact for vLLM,
    rounded differently by transformers (`compressed_tensors_loader_notes`)."""
    fmt = fmt or compressed_tensors_format(scheme)
    group = {
        "targets": list(targets),
        "weights": _weight_args(scheme),
        "input_activations": dict(_INT8_PER_TOKEN_ARGS) if scheme.act_quant else None,
        "output_activations": None,
        "format": fmt,
    }
    return {
        "quant_method": "compressed-tensors",
        "format": fmt,
        "quantization_status": "compressed",
        "config_groups": {"group_0": group},
        "ignore": list(ignore),
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
    }


def compressed_tensors_loader_notes(act_quant: str | None) -> list[str]:
    """What transformers computes differently from our quantized model for a checkpoint of this activation
    quantization (for the manifest and the report)."""
    return [W8A8_LOADER_NOTE] if act_quant is not None else []


def ct_fake_quant_int8_per_token(x: torch.Tensor) -> torch.Tensor:
    """x [..., in] → compressed-tensors 0.20.1's dynamic symmetric int8 per-token quantize-dequantize.

    scale = absmax/127.5 (0 → eps), codes = clamp(x/scale, -128, 127) rounded half-to-even. Theirs reduces over
    every dim but the first two, so it is per token for [batch, seq, in] inputs (the shape transformers passes).
    Ours: qform.fake_quant_int8_per_token (absmax/127, [-127, 127])."""
    xf = x.float()
    absmax = xf.abs().amax(dim=-1, keepdim=True)  # [..., 1]
    scale = torch.where(absmax == 0, torch.finfo(torch.float32).eps, absmax / 127.5)
    return (xf / scale).clamp(-128, 127).round().mul(scale).to(x.dtype)


def scheme_from_config_group(group: dict[str, Any]) -> QScheme:
    """One config_groups entry → QScheme; refuses what the IR cannot hold."""
    w, ia = group.get("weights") or {}, group.get("input_activations")
    if w.get("type") != "int" or w.get("strategy") not in ("group", "channel"):
        raise InputError(
            f"compressed-tensors weights {w}: only int weights with strategy group/channel are supported."
        )
    act_quant = None
    if ia is not None:
        if not (
            ia.get("num_bits") == 8
            and ia.get("strategy") == "token"
            and ia.get("dynamic")
            and ia.get("symmetric", True)
        ):
            raise InputError(
                f"compressed-tensors input_activations {ia}: only dynamic symmetric int8 per-token "
                "activations are supported."
            )
        act_quant = "int8_per_token_dynamic"
    group_size = w["group_size"] if w["strategy"] == "group" else -1
    return QScheme(
        bits=w["num_bits"],
        group_size=group_size,
        symmetric=w.get("symmetric", True),
        act_order=w.get("actorder")
        in ("group", "dynamic"),  # legacy (< 0.20) g_idx act-order; "weight" has none
        act_quant=act_quant,
    )
