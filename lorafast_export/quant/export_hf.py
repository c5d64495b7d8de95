"""A quantized Hugging Face checkpoint in a standard format (GPTQ, AWQ or compressed-tensors) from a QuantizedModel.

`write_quantized_checkpoint(inp, out_dir)` packs every QTensor with the formats module, writes the fp tensors
(embeddings, norms with folded scales, lm_head) from the QuantizedModel (never from the merged checkpoint, whose
norms lack the folded scales), config.json with the format's `quantization_config`, and the tokenizer files.
Combinations a format cannot hold are refused up front, every problem at once, each with the fix. What a
loader computes differently from our quantized model (W8A8 in transformers) goes into the facts' loader_notes.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from lorafast_export.checkpoint import ShardWriter
from lorafast_export.errors import InputError
from lorafast_export.model.quantized import QuantizedModel, q_info
from lorafast_export.qform import ACT_QUANT_INT8_PER_TOKEN, QScheme, QTensor, pad_qtensor
from lorafast_export.quant import formats
from lorafast_export.quant.formats.compressed_tensors import ACT_ORDER_REFUSAL
from lorafast_export.weights import TOKENIZER_FILES

HF_FORMATS = ("gptq", "awq", "compressed-tensors")
# hf_format=auto: the first format, in this order, that can hold the model. compressed-tensors comes first: plain
# transformers (+ the compressed-tensors package) and vLLM load it, while GPTQ/AWQ checkpoints need GPTQModel.
# GPTQ (with g_idx) catches what compressed-tensors cannot hold (act-order, ragged groups).
AUTO_FORMATS = {
    "gptq": ("compressed-tensors", "gptq"),
    "awq": ("compressed-tensors", "awq", "gptq"),
    "awq-gptq": ("compressed-tensors", "awq", "gptq"),
    "rtn": ("compressed-tensors", "gptq"),
    "int8": ("compressed-tensors", "gptq"),
    "smoothquant": ("compressed-tensors",),
}
# compressed-tensors and AWQ kernels need the group to divide in_features: a ragged MLP width is padded (as the
# trt-llm target does) with gate/up output rows and down_proj input columns that dequantize to exactly 0.
PAD_FORMATS = ("compressed-tensors", "awq")
PADDED_MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
PACKERS: dict[str, Callable[[QTensor], dict[str, torch.Tensor]]] = {
    "gptq": formats.pack_gptq,
    "awq": formats.pack_awq,
    "compressed-tensors": formats.pack_compressed_tensors,
}


def resolve_format(requested: str, qm: QuantizedModel, scheme: QScheme) -> str:
    """`auto` → compressed-tensors, or the next format in AUTO_FORMATS when that one cannot hold this model. Refuses what the chosen format cannot hold."""
    if requested != "auto" and requested not in HF_FORMATS:
        raise InputError(f"target.hf_format={requested!r}: use auto or one of {', '.join(HF_FORMATS)}.")
    candidates = AUTO_FORMATS[qm.settings["method"]] if requested == "auto" else (requested,)
    for fmt in candidates:
        if not format_problems(fmt, scheme, qm):
            return fmt
    problems = format_problems(candidates[0], scheme, qm)
    raise InputError(
        f"cannot write the {qm.settings['method']} model as a {candidates[0]} checkpoint:\n  - "
        + "\n  - ".join(problems)
    )


def model_scheme(qm: QuantizedModel) -> QScheme:
    """The one scheme a checkpoint's quantization_config describes; mixed schemes cannot be written as one."""
    infos = q_info(qm.q).values()  # from the headers: a spilled model's codes are not read here
    schemes = {(i.scheme.bits, i.scheme.group_size, i.scheme.symmetric, i.scheme.act_quant) for i in infos}
    if len(schemes) != 1:
        raise InputError(
            f"quantized layers use {len(schemes)} different schemes {sorted(schemes, key=str)}; "
            "one checkpoint quantization_config describes one. Quantize all layers alike."
        )
    bits, group_size, symmetric, act_quant = schemes.pop()
    act_order = any(i.scheme.act_order for i in infos)
    return QScheme(bits, group_size, symmetric, act_order, act_quant)


def format_problems(fmt: str, scheme: QScheme, qm: QuantizedModel) -> list[str]:
    """Why `fmt` cannot hold this model (empty when it can)."""
    p = []
    if fmt in ("gptq", "awq") and scheme.act_quant is not None:
        p.append(
            f"{fmt} checkpoints are weight-only; {qm.settings.get('method')} quantizes activations too "
            "(W8A8): use --hf-format compressed-tensors"
        )
    if fmt == "awq":
        if scheme.bits != 4:
            p.append(
                f"awq stores 4-bit weights only (these are {scheme.bits}-bit): use gptq or compressed-tensors"
            )
        if scheme.group_size == -1:
            p.append(
                "awq needs grouped scales, not per-channel (group_size=-1): use --group-size 128, or "
                "gptq / compressed-tensors"
            )
        if scheme.act_order:
            p.append("awq has no act-order (g_idx): quantize without --act-order, or export as gptq")
    infos = q_info(qm.q)
    ragged = [
        n
        for n, i in infos.items()
        if i.scheme.group_size != -1
        and i.in_features % i.scheme.group_size
        and not n.endswith(PADDED_MLP[-1])
    ]
    if fmt in ("compressed-tensors", "awq") and ragged:
        p.append(
            f"{fmt} needs in_features to be a multiple of group_size={scheme.group_size}, but "
            f"{len(ragged)} layer(s) (e.g. {ragged[0]}, in_features={infos[ragged[0]].in_features}) are not: "
            "export as gptq (g_idx holds ragged groups), or quantize with a group size dividing them "
            "(a ragged MLP width alone is padded)"
        )
    if fmt == "compressed-tensors" and scheme.act_order:
        p.append(ACT_ORDER_REFUSAL)
    if fmt in ("gptq", "awq"):
        inexact = [
            n
            for n, qt in qm.q.items()
            if not torch.equal(qt.scales.to(torch.float16).to(qt.scales.dtype), qt.scales)
        ]
        if inexact:
            p.append(
                f"{fmt} stores float16 scales, but {len(inexact)} layer(s) (e.g. {inexact[0]}) have "
                f"{qm.q[inexact[0]].scales.dtype} scales that float16 cannot hold exactly: use compressed-tensors"
            )
        pf = 32 // scheme.bits
        for name, i in infos.items():
            dims = {"in": i.in_features, "out": i.out_features} if fmt == "gptq" else {"out": i.out_features}
            p += [
                f"{name}: {k}_features={v} is not a multiple of {pf if fmt == 'gptq' else 8} ({fmt} packing)"
                for k, v in dims.items()
                if v % (pf if fmt == "gptq" else 8)
            ]
    return p


def padded_mlp_width(fmt: str, scheme: QScheme, intermediate_size: int) -> int:
    """The checkpoint's intermediate_size: rounded up to whole groups for PAD_FORMATS, else the model's."""
    gs = scheme.group_size
    if fmt not in PAD_FORMATS or gs == -1:
        return intermediate_size
    return -(-intermediate_size // gs) * gs


def padded(name: str, qt: QTensor, width: int) -> QTensor:
    """qt as the checkpoint holds it when the MLP width is padded to `width` (pad_qtensor; others unchanged)."""
    if name.endswith(PADDED_MLP[:2]) and qt.out_features < width:
        return pad_qtensor(qt, out_features=width)
    if name.endswith(PADDED_MLP[2]) and qt.in_features < width:
        return pad_qtensor(qt, in_features=width)
    return qt


def quantization_config(fmt: str, scheme: QScheme, qm: QuantizedModel) -> dict:
    keep_fp = [] if "lm_head" in qm.q else ["lm_head"]
    if fmt == "gptq":
        cfg = formats.gptq_quant_config(
            scheme,
            damp_percent=qm.settings.get("damp_percent", 0.01),
            # the walk as recorded (config.py); artifacts written before it was recorded: the method's walk then
            true_sequential=qm.settings.get("true_sequential", qm.settings.get("method") != "awq-gptq"),
        )
        return {**cfg, "lm_head": "lm_head" in qm.q}
    if fmt == "awq":
        return formats.awq_quant_config(scheme, modules_to_not_convert=keep_fp or None)
    return formats.compressed_tensors_config(scheme, ignore=tuple(keep_fp))


def _compressed_tensors_config(model_dir: str | Path) -> dict | None:
    """config.json's quantization_config where it is compressed-tensors', else None."""
    qcfg = json.loads((Path(model_dir) / "config.json").read_text()).get("quantization_config") or {}
    return qcfg if qcfg.get("quant_method") == "compressed-tensors" else None


def asymmetric_pack_quantized(model_dir: str | Path) -> bool:
    """Whether config.json describes a compressed-tensors pack-quantized checkpoint with (packed) zero points."""
    qcfg = _compressed_tensors_config(model_dir) or {}
    return any(
        (g.get("format") or qcfg.get("format")) == "pack-quantized"
        and (g.get("weights") or {}).get("symmetric") is False
        for g in (qcfg.get("config_groups") or {}).values()
    )


def checkpoint_loader_notes(model_dir: str | Path) -> list[str]:
    """What transformers computes differently from our quantized model when it loads this checkpoint (a W8A8
    compressed-tensors one: its activation rounding), read from config.json; [] for any other checkpoint."""
    qcfg = _compressed_tensors_config(model_dir)
    if qcfg is None:
        return []
    acts = [g.get("input_activations") or {} for g in (qcfg.get("config_groups") or {}).values()]
    int8_tokens = any(a.get("num_bits") == 8 and a.get("strategy") == "token" for a in acts)
    return formats.compressed_tensors_loader_notes(ACT_QUANT_INT8_PER_TOKEN if int8_tokens else None)


def write_quantized_checkpoint(inp, out_dir: str | Path) -> dict:
    """inp: targets.registry.LowerInput with .quantized set. Writes out_dir; returns facts for the manifest."""
    qm: QuantizedModel = inp.quantized
    if qm is None or not qm.q:
        raise InputError("a quantized hf checkpoint needs a quant method; set quant.method (or --quant).")
    scheme = model_scheme(qm)
    fmt = resolve_format(inp.recipe.target.hf_format, qm, scheme)
    width = padded_mlp_width(fmt, scheme, qm.config.intermediate_size)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(out)
    for name, qt in qm.q.items():
        writer.add({f"{name}.{k}": v for k, v in PACKERS[fmt](padded(name, qt, width)).items()})
    writer.add({k: v.detach().cpu() for k, v in qm.fp.items()})
    files = writer.finish()
    config = json.loads((Path(inp.merged_dir) / "config.json").read_text())
    config["quantization_config"] = quantization_config(fmt, scheme, qm)
    config["intermediate_size"] = width  # the checkpoint's (padded) MLP width: what every loader builds
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for name in TOKENIZER_FILES:
        if (Path(inp.merged_dir) / name).exists():
            shutil.copy2(Path(inp.merged_dir) / name, out / name)
    facts = {
        "format": fmt,
        "quant_method": qm.settings["method"],
        "bits": scheme.bits,
        "group_size": scheme.group_size,
        "symmetric": scheme.symmetric,
        "act_order": scheme.act_order,
        "files": [f.name for f in files],
    }
    if width != qm.config.intermediate_size:
        facts["intermediate_size_padded"] = {"from": qm.config.intermediate_size, "to": width}
    notes = formats.compressed_tensors_loader_notes(scheme.act_quant) if fmt == "compressed-tensors" else []
    return facts | ({"loader_notes": notes} if notes else {})
