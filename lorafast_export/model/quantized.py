"""QuantizedModel: the whole model in the one quantized form, as every target receives it.

`q` maps module paths (model.layers.0.self_attn.q_proj) to qform.QTensor (codes, scales, zeros, g_idx, and the
linear's bias in QTensor.bias). `fp` holds every other tensor under its HF name: embeddings, norms (with any
AWQ/SmoothQuant input scales already folded in, so they differ from the merged checkpoint's), lm_head (unless
quantize_lm_head), and unquantized linears with their biases. Targets must take fp tensors from here, not from the
merged checkpoint.

`fake_quant_decoder(qm)` is the reference of this form (the "quantized" stage of validation): the canonical
decoder with each quantized linear a qform.QLinear. `save_quantized` / `load_quantized` keep a QuantizedModel in
our own layout:

    quantized.json          {"format", "version", "config": the HF config.json dict, "settings"}
    qtensors.safetensors    qform.save_qtensors (codes, scales, zeros, g_idx, biases, input scales)
    fp.safetensors          the fp tensors under their HF names
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lorafast_export.errors import InputError
from lorafast_export.model.spec import ModelConfig
from lorafast_export.qform import QLinear, load_qtensors, save_qtensors

QUANTIZED_FORMAT = "lorafast-quantized"
QUANTIZED_VERSION = 1
META_FILE, Q_FILE, FP_FILE = "quantized.json", "qtensors.safetensors", "fp.safetensors"


@dataclass
class QuantizedModel:
    config: ModelConfig
    fp: dict[str, torch.Tensor]
    q: dict[str, object]  # module path → lorafast_export.qform.QTensor
    settings: dict = field(default_factory=dict)  # resolved quant settings (method, bits, group_size, ...)


def fake_quant_decoder(qm: QuantizedModel, dtype: torch.dtype = torch.float32):
    """The canonical Decoder with fp tensors from qm.fp (cast to dtype) and a QLinear for every qm.q entry.

    A quantized lm_head of a tied model is untied: the embedding keeps its fp weights, the head gets the codes.
    """
    from lorafast_export.model.decoder import Decoder, Rotary

    cfg = qm.config
    if "lm_head" in qm.q and cfg.tie_word_embeddings:
        cfg = dataclasses.replace(cfg, tie_word_embeddings=False)
    with torch.device("meta"):
        dec = Decoder(cfg)
    for path, qt in qm.q.items():
        parent, _, leaf = path.rpartition(".")
        setattr(dec.get_submodule(parent) if parent else dec, leaf, QLinear(qt))
    fp = {k: v.to(dtype) for k, v in qm.fp.items() if not (cfg.tie_word_embeddings and k == "lm_head.weight")}
    result = dec.load_state_dict(fp, strict=False, assign=True)
    dec.rotary = Rotary(cfg)
    still_meta = [n for n, p in [*dec.named_parameters(), *dec.named_buffers()] if p.is_meta]
    if result.unexpected_keys or still_meta:
        raise InputError(
            "quantized model does not match its config: "
            + (f"unexpected fp tensors {result.unexpected_keys[:5]}; " if result.unexpected_keys else "")
            + (f"missing tensors {still_meta[:5]}" if still_meta else "")
        )
    return dec.eval()


def save_quantized(qm: QuantizedModel, out_dir: str | Path) -> Path:
    """Write qm to out_dir in our own layout (module docstring); returns out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_qtensors(out / Q_FILE, qm.q)
    save_file({k: v.detach().cpu().contiguous() for k, v in qm.fp.items()}, str(out / FP_FILE))
    meta = {"format": QUANTIZED_FORMAT, "version": QUANTIZED_VERSION, "config": qm.config.raw,
            "settings": qm.settings}
    (out / META_FILE).write_text(json.dumps(meta, indent=2, default=str) + "\n")
    return out


def load_quantized(model_dir: str | Path) -> QuantizedModel:
    """Inverse of save_quantized."""
    d = Path(model_dir)
    missing = [n for n in (META_FILE, Q_FILE, FP_FILE) if not (d / n).is_file()]
    if missing:
        raise InputError(f"{d}: not a saved quantized model (missing {', '.join(missing)}); "
                         "write one with lorafast_export.model.quantized.save_quantized.")
    meta = json.loads((d / META_FILE).read_text())
    if meta.get("format") != QUANTIZED_FORMAT or meta.get("version") != QUANTIZED_VERSION:
        raise InputError(f"{d / META_FILE}: format/version {meta.get('format')}/{meta.get('version')} is not "
                         f"{QUANTIZED_FORMAT}/{QUANTIZED_VERSION}; re-quantize with this lorafast-export version.")
    cfg = ModelConfig.from_dict(meta["config"], str(d / META_FILE))
    return QuantizedModel(config=cfg, fp=load_file(str(d / FP_FILE)), q=load_qtensors(d / Q_FILE),
                          settings=meta.get("settings", {}))
