"""lower(): merged or quantized model → model/ that openvino-genai loads as is.

model/openvino_model.xml|bin          stateful decoder IR (export.py), QTensor codes as compressed weights
model/openvino_tokenizer.xml|bin      openvino-tokenizers IRs of the HF tokenizer
model/openvino_detokenizer.xml|bin
model/config.json, generation_config.json, tokenizer files (what genai and transformers read)
"""

from __future__ import annotations

import json
import logging
import shutil
from collections import Counter
from pathlib import Path

from lorafast_export.errors import InputError, UnsupportedError
from lorafast_export.specs import ov_option_problems
from lorafast_export.targets.openvino.compress import compress_weights
from lorafast_export.targets.openvino.export import ExportLinear, convert, make_stateful, weight_constant_name
from lorafast_export.targets.openvino.source import source_decoder
from lorafast_export.weights import TOKENIZER_FILES

MODEL_XML = "openvino_model.xml"
TOKENIZER_XML = "openvino_tokenizer.xml"
DETOKENIZER_XML = "openvino_detokenizer.xml"
PROMISED_OPS = ("ScaledDotProductAttention", "ReadValue", "Assign")
log = logging.getLogger(__name__)


def check_target_options(options: dict, dtype: str) -> None:
    """The recipe was checked against the same spec when it was read; lower() is also called directly. An unknown
    option is bad input; a dtype this target does not build is unsupported."""
    for problems, error in (
        (ov_option_problems(options, "auto"), InputError),
        (ov_option_problems({}, dtype), UnsupportedError),
    ):
        if problems:
            raise error(" ".join(problems))


def lower_openvino(inp, out_dir: Path) -> dict:
    import openvino as ov

    recipe_target = getattr(inp.recipe, "target", None)
    check_target_options(
        dict(getattr(recipe_target, "options", None) or {}), getattr(recipe_target, "dtype", "auto")
    )
    tokenizer = _load_hf_tokenizer(Path(inp.merged_dir))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    dec = source_decoder(Path(inp.merged_dir), inp.quantized, ExportLinear)
    om = convert(dec)
    del dec
    n_compressed = compress_weights(om, inp.quantized.q, weight_constant_name) if inp.quantized else 0
    make_stateful(om)
    om.set_rt_info("lorafast-export", ["lorafast_export", "producer"])
    if inp.quantized is not None:
        om.set_rt_info(json.dumps(inp.quantized.settings, default=str), ["lorafast_export", "quant"])
    facts = ir_facts(om)
    missing = [op for op in PROMISED_OPS if not facts["ops"].get(op)]
    if missing:
        raise RuntimeError(f"internal: the lowered IR lacks {missing}; openvino-genai would not run it")
    ov.save_model(om, out_dir / MODEL_XML, compress_to_fp16=False)
    write_tokenizers(tokenizer, out_dir)
    copied = _copy_side_files(Path(inp.merged_dir), out_dir)
    facts["paged_attention_sliding_window"] = _paged_window_note(inp.config)
    return {
        "format": "openvino-ir",
        "stateful": True,
        "compressed_linears": n_compressed,
        **facts,
        "files": sorted([MODEL_XML, TOKENIZER_XML, DETOKENIZER_XML, *copied]),
    }


def _paged_window_note(cfg) -> str:
    if not cfg.sliding_window or cfg.sliding_window >= cfg.max_position_embeddings:
        return "not needed"
    log.warning(
        "sliding_window=%d: LLMPipeline and validation apply it, but ContinuousBatchingPipeline's "
        "paged attention does not; contexts longer than the window differ there.",
        cfg.sliding_window,
    )
    return "ignored by ContinuousBatchingPipeline"


def ir_facts(om) -> dict:
    """Op-type counts of what we promise, and the element types of the compressed weight constants."""
    ops = Counter(n.get_type_name() for n in om.get_ops())
    low_bit = Counter(
        str(n.get_element_type().get_type_name())
        for n in om.get_ops()
        if n.get_type_name() == "Constant"
        and n.get_friendly_name().endswith(".weight")
        and n.get_element_type().is_integral()
    )
    keep = (*PROMISED_OPS, "MatMul", "Parameter")
    return {"ops": {k: ops[k] for k in keep}, "weight_types": dict(low_bit)}


def _load_hf_tokenizer(merged_dir: Path):
    import transformers

    if not any((merged_dir / n).exists() for n in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise InputError(
            f"{merged_dir}: no tokenizer files (tokenizer.json, tokenizer.model or vocab.json). "
            "openvino-genai needs the tokenizer; put it next to the base model's config.json."
        )
    return transformers.AutoTokenizer.from_pretrained(merged_dir)


def write_tokenizers(hf_tokenizer, out_dir: Path) -> None:
    import openvino as ov
    import openvino_tokenizers

    tok, detok = openvino_tokenizers.convert_tokenizer(hf_tokenizer, with_detokenizer=True)
    ov.save_model(tok, out_dir / TOKENIZER_XML)
    ov.save_model(detok, out_dir / DETOKENIZER_XML)


def _copy_side_files(src: Path, dst: Path) -> list[str]:
    names = [n for n in ("config.json", *TOKENIZER_FILES) if (src / n).exists()]
    for n in names:
        shutil.copy2(src / n, dst / n)
    return names
