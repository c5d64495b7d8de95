"""The torch-compile artifact (model/): write it from a build, read it back into a runtime decoder.

    model/
      runtime.json           what every file is: format, dtype, weight files, quant settings, options, aot
      config.json            the merged model's HF config (+ tokenizer files)
      weights-*.safetensors  fp tensors under HF names, in the artifact dtype, one shard per decoder layer
      qweights.safetensors   the quantized form (qform's layout), when a quant method ran
      prefill.pt2 decode.pt2 AOTInductor packages for the build device (option aot)

fp weights stream from the merged checkpoint one layer at a time, so lowering needs about one layer of memory.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch

from lorafast_export.checkpoint import save_safetensors
from lorafast_export.dtypes import TORCH_DTYPES
from lorafast_export.errors import InputError
from lorafast_export.model.quantized import open_qtensors, read_on_device, save_qtensors_streamed
from lorafast_export.model.spec import LM_HEAD, ModelConfig, layer_prefix
from lorafast_export.runtime.options import RuntimeOptions
from lorafast_export.weights import WeightStore, open_model, tokenizer_files

log = logging.getLogger(__name__)

FORMAT = "lorafast-torch-runtime"
VERSION = 1
META_FILE = "runtime.json"
QWEIGHTS = "qweights.safetensors"
DTYPES = TORCH_DTYPES  # artifact.json names its dtype as the recipe does


def resolve_dtype(requested: str, cfg: ModelConfig) -> str:
    """recipe.target.dtype → artifact dtype name; auto = the merged checkpoint's dtype (float32 if unknown)."""
    if requested != "auto":
        return requested
    return cfg.torch_dtype if cfg.torch_dtype in DTYPES else "float32"


def _shard_of(name: str, n_layers: int) -> str:
    for i in range(n_layers):
        if name.startswith(layer_prefix(i)):
            return f"weights-layer{i:03d}.safetensors"
    return "weights-other.safetensors"


HEAD_ROWS = 8192  # lm_head rows quantized at a time (int8_head): a 128k-row head never whole in float32


def int8_head(cfg: ModelConfig, fp: Mapping, q: Mapping) -> tuple[Mapping, dict, str]:
    """A quantized model's fp without its lm_head, {"lm_head": the head int8 per output channel, symmetric
    (quant/int8.py: the signed grid, float32 scales)} to add to q, and "int8"; or fp as given, {} and why: the
    head is tied to the embeddings ("tied"), absent ("none") or already quantized ("quantized"). The
    torch-compile target's option lm_head."""
    from lorafast_export.quant.int8 import quantize_int8_weight

    if cfg.tie_word_embeddings or LM_HEAD not in fp:
        return fp, {}, "tied" if cfg.tie_word_embeddings else "none"
    if "lm_head" in q:
        return fp, {}, "quantized"
    w = fp[LM_HEAD]
    codes = torch.empty(w.shape, dtype=torch.uint8, device=w.device)  # filled in place: one copy of the codes
    scales = torch.empty(w.shape[0], 1, dtype=torch.float32, device=w.device)
    for i in range(0, w.shape[0], HEAD_ROWS):
        part = quantize_int8_weight(w[i : i + HEAD_ROWS])
        codes[i : i + HEAD_ROWS], scales[i : i + HEAD_ROWS] = part.codes, part.scales
    head = dataclasses.replace(part, codes=codes, scales=scales)
    return _Without(fp, LM_HEAD), {"lm_head": head}, "int8"


class _Without(Mapping):
    """A Mapping view of another without one key (a lazy fp view stays lazy; a dict is not copied)."""

    def __init__(self, base: Mapping, key: str):
        self.base, self.key = base, key

    def __getitem__(self, k):
        if k == self.key:
            raise KeyError(k)
        return self.base[k]

    def __iter__(self):
        return (k for k in self.base if k != self.key)

    def __len__(self):
        return len(self.base) - (self.key in self.base)


def _save_shards(out_dir: Path, names: list[str], get, dtype: torch.dtype, n_layers: int) -> list[str]:
    """Write fp tensors grouped by decoder layer; `get(name)` loads one tensor (memory: one shard)."""
    shards: dict[str, list[str]] = {}
    for n in names:
        shards.setdefault(_shard_of(n, n_layers), []).append(n)
    for file, members in shards.items():
        save_safetensors({n: get(n).to(dtype).contiguous() for n in members}, out_dir / file)
    return sorted(shards)


def write_artifact(
    merged_dir: Path, out_dir: Path, dtype_name: str, opts: RuntimeOptions, quantized=None
) -> dict:
    """Write model/ (see module doc). `quantized`: a QuantizedModel or None. Returns facts for the manifest."""
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = DTYPES[dtype_name]
    shutil.copy2(merged_dir / "config.json", out_dir / "config.json")
    for f in tokenizer_files(merged_dir):
        shutil.copy2(f, out_dir / f.name)
    if quantized is None:
        if opts.lm_head == "int8":
            raise InputError(
                "torch-compile target option lm_head: int8 stores the head beside a quantized decoder; set a "
                "quant method (e.g. --quant awq) or lm_head: auto."
            )
        opts = opts.replace(lm_head="keep")
        md = open_model(merged_dir)
        cfg = md.config
        names = [k for k in md.store.keys() if not k.endswith("rotary_emb.inv_freq")]
        files = _save_shards(out_dir, names, md.store.get, dtype, cfg.num_layers)
        qfile = None
    else:  # merged_dir may hold no weights (the merge stage's view): everything comes from `quantized`
        cfg = quantized.config
        fp, extra, head = quantized.fp, {}, "keep"
        if opts.lm_head != "keep":
            fp, extra, head = int8_head(cfg, fp, quantized.q)
            log.info(
                "%s: lm_head %s", out_dir, "int8 per channel" if head == "int8" else f"as stored ({head})"
            )
        opts = opts.replace(lm_head="int8" if head == "int8" else "keep")
        files = _save_shards(out_dir, sorted(fp), fp.__getitem__, dtype, cfg.num_layers)
        # tensor by tensor: never all codes in memory
        save_qtensors_streamed(out_dir / QWEIGHTS, quantized.q, extra)
        qfile = QWEIGHTS
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "dtype": dtype_name,
        "weights": files,
        "qweights": qfile,
        "quant": None if quantized is None else dict(quantized.settings),
        "options": opts.to_dict(),
        "aot": None,
    }
    write_meta(out_dir, meta)
    return {
        "format": FORMAT,
        "dtype": dtype_name,
        "quantized": quantized is not None,
        "weight_files": len(files) + (qfile is not None),
        "lm_head": opts.lm_head,
    }


def write_meta(model_dir: Path, meta: dict) -> None:
    (model_dir / META_FILE).write_text(json.dumps(meta, indent=2))


def read_meta(model_dir: Path) -> dict:
    path = Path(model_dir) / META_FILE
    if not path.exists():
        raise InputError(
            f"{model_dir}: no {META_FILE}; this is not a torch-compile artifact's model/ directory."
        )
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise InputError(
            f"{path}: format {meta.get('format')}/{meta.get('version')} is not {FORMAT}/{VERSION}; "
            "rebuild the artifact with this lorafast-export version."
        )
    return meta


def read_weights(model_dir: Path, meta: dict, device) -> tuple[dict[str, torch.Tensor], Mapping | None]:
    """(fp tensors by HF name on device, {module path: QTensor} or None). The QTensors are read from disk one
    module per lookup (the loader lowers each onto the device in turn), never all on the host together; their
    stored tensors go to the device as read (4-bit codes packed) and are unpacked and repacked there."""
    model_dir = Path(model_dir)
    missing = [f for f in meta["weights"] + [meta["qweights"] or ""] if f and not (model_dir / f).exists()]
    if missing:
        raise InputError(f"{model_dir}: weight files {missing} listed in {META_FILE} are missing; rebuild.")
    store = WeightStore(
        [model_dir / f for f in meta["weights"]]
    )  # on a GPU: through the pinned staging buffer
    fp = {name: read_on_device(store, name, device) for name in store.keys()}
    q = open_qtensors([model_dir / meta["qweights"]], device) if meta["qweights"] else None
    return fp, q
