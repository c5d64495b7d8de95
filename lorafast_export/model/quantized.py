"""QuantizedModel: the whole model in the one quantized form, as every target receives it.

`q` maps module paths (model.layers.0.self_attn.q_proj) to qform.QTensor (codes, scales, zeros, g_idx, and the
linear's bias in QTensor.bias). `fp` holds every other tensor under its HF name: embeddings, norms (with any
AWQ/SmoothQuant input scales already folded in, so they differ from the merged checkpoint's), lm_head (unless
quantize_lm_head), and unquantized linears with their biases. Targets must take fp tensors from here, not from the
merged checkpoint. Both are Mappings: plain dicts in memory, or lazy views of a saved directory that read one
entry from disk per lookup, so a consumer that walks them in order holds one tensor at a time.

`fake_quant_decoder(qm)` is the reference of this form (the "quantized" stage of validation): the canonical
decoder with each quantized linear a qform.QLinear. `save_quantized` / `QuantizedWriter` keep a QuantizedModel in
our own layout, one part per decoder layer (the quantize stage spills each layer as soon as it is done, so the
codes of a larger-than-memory model never sit in RAM together), and `load_quantized` reads it back lazily:

    quantized.json          {"format", "version", "config": the HF config.json dict, "settings",
                             "parts": [{"file", "q": [module paths], "fp": [tensor names]}, ...]}
                            written last: a directory without it is not a finished quantized model
    part-00000.safetensors  that part's QTensors (qform's layout and header metadata) and fp tensors
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lorafast_export.checkpoint import save_safetensors
from lorafast_export.errors import InputError
from lorafast_export.model.spec import ModelConfig
from lorafast_export.qform import (
    QLinear,
    QScheme,
    QTensor,
    qform_entries,
    qform_metadata,
    qtensor_from_entry,
    qtensors_to_state_dict,
    save_qtensors,
)
from lorafast_export.weights import WeightStore, check_safetensors_header

QUANTIZED_FORMAT = "lorafast-quantized"
QUANTIZED_VERSION = 2
META_FILE = "quantized.json"


@dataclass
class QuantizedModel:
    config: ModelConfig
    fp: Mapping[str, torch.Tensor]
    q: Mapping[str, QTensor]  # module path → QTensor
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


class QuantizedWriter:
    """Writes a QuantizedModel part by part (module docstring); `finish` writes quantized.json last."""

    def __init__(self, out_dir: str | Path):
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.parts: list[dict] = []

    def add(self, q: Mapping[str, QTensor], fp: Mapping[str, torch.Tensor]) -> None:
        tensors, metadata = qtensors_to_state_dict(dict(q))
        clash = tensors.keys() & fp.keys()
        if clash:
            raise ValueError(f"fp tensor names {sorted(clash)[:3]} collide with quantized parts")
        tensors.update({k: v.detach().cpu().contiguous() for k, v in fp.items()})
        file = f"part-{len(self.parts):05d}.safetensors"
        save_safetensors(tensors, self.out / file, metadata)
        self.parts.append({"file": file, "q": sorted(q), "fp": sorted(fp)})

    def finish(self, config: ModelConfig, settings: dict) -> Path:
        meta = {
            "format": QUANTIZED_FORMAT,
            "version": QUANTIZED_VERSION,
            "config": config.raw,
            "settings": settings,
            "parts": self.parts,
        }
        (self.out / META_FILE).write_text(json.dumps(meta, indent=2, default=str) + "\n")
        return self.out


def save_quantized(qm: QuantizedModel, out_dir: str | Path) -> Path:
    """Write qm to out_dir in our own layout (module docstring), one part per decoder layer; returns out_dir."""
    writer = QuantizedWriter(out_dir)
    groups: dict[int, tuple[dict, dict]] = {}
    for kind, mapping in (("q", qm.q), ("fp", qm.fp)):
        for name in mapping:
            m = re.match(r"model\.layers\.(\d+)\.", name)
            group = groups.setdefault(int(m.group(1)) if m else -1, ({}, {}))
            group[0 if kind == "q" else 1][name] = mapping[name]
    for _, (q, fp) in sorted(groups.items()):
        writer.add(q, fp)
    return writer.finish(qm.config, qm.settings)


def load_quantized(model_dir: str | Path) -> QuantizedModel:
    """The QuantizedModel saved in model_dir, with lazy `q` and `fp` (each lookup reads one entry from disk)."""
    d = Path(model_dir)
    if not (d / META_FILE).is_file():
        raise InputError(
            f"{d}: not a saved quantized model (no {META_FILE}); "
            "write one with lorafast_export.model.quantized.save_quantized."
        )
    meta = json.loads((d / META_FILE).read_text())
    if meta.get("format") != QUANTIZED_FORMAT or meta.get("version") != QUANTIZED_VERSION:
        raise InputError(
            f"{d / META_FILE}: format/version {meta.get('format')}/{meta.get('version')} is not "
            f"{QUANTIZED_FORMAT}/{QUANTIZED_VERSION}; re-quantize with this lorafast-export version."
        )
    files = [d / p["file"] for p in meta["parts"]]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise InputError(f"{d}: part file(s) {missing[:3]} listed in {META_FILE} are missing; re-quantize.")
    cfg = ModelConfig.from_dict(meta["config"], str(d / META_FILE))
    q = open_qtensors(files)
    fp_names = [n for p in meta["parts"] for n in p["fp"]]
    return QuantizedModel(
        config=cfg, fp=LazyTensors(q.store, fp_names), q=q, settings=meta.get("settings", {})
    )


def open_qtensors(files: list[Path], device: torch.device | str | None = None) -> LazyQTensors:
    """The QTensors of qform files (qform.save_qtensors, quantized parts), read one module per lookup with
    positional reads: a module's memory is freed when its user drops it. device: each stored tensor is moved
    there as read (4-bit codes still packed, half a byte a weight) and unpacked there."""
    store = WeightStore(files)
    entries = {}
    for f in files:
        entries.update(qform_entries(check_safetensors_header(f).get("__metadata__"), str(f)))
    return LazyQTensors(store, entries, device)


def save_qtensors_streamed(
    path: Path, q: Mapping[str, QTensor], extra: Mapping[str, QTensor] | None = None
) -> None:
    """q and extra (in memory, e.g. a head quantized at lowering) as one qform file (qform.save_qtensors'
    layout). A lazy q (a saved quantized model) is copied from its files tensor by tensor, so its codes are never
    in memory together; an in-memory one is saved as it is."""
    extra = dict(extra or {})
    if not isinstance(q, LazyQTensors):
        save_qtensors(path, {**q, **extra})
        return
    names = [f"{m}.{part}" for m, e in q.entries.items() if m not in extra for part in e["parts"]]
    tensors, meta = qtensors_to_state_dict(extra)
    entries = {m: e for m, e in q.entries.items() if m not in extra} | qform_entries(meta, "extra")
    q.store.copy_to(path, names, qform_metadata(entries), tensors)


@dataclass(frozen=True)
class QInfo:
    """What a quantized linear is, without reading its tensors."""

    scheme: QScheme
    out_features: int
    in_features: int


def q_info(q: Mapping[str, QTensor]) -> dict[str, QInfo]:
    """{module: QInfo} for in-memory and lazy models alike; a lazy model answers from its headers alone."""
    if isinstance(q, LazyQTensors):
        return q.info()
    return {n: QInfo(qt.scheme, qt.out_features, qt.in_features) for n, qt in q.items()}


def read_on_device(store: WeightStore, name: str, device) -> torch.Tensor:
    """A stored tensor on `device`: on a GPU read straight into the pinned staging buffer of
    lorafast_export/staging.py and copied from there (a pageable copy runs ~1.1 GB/s on the H200 machine)."""
    span = store.span_of(name)
    if span is None or not span[2]:  # pickled or empty: as stored
        return store.get(name).to(device)
    from lorafast_export.staging import read_to_device

    path, offset, nbytes, dtype, shape = span
    return read_to_device(path, offset, nbytes, device, f"tensor {name!r}").view(dtype).reshape(shape)


class LazyTensors(Mapping):
    """name → tensor, read from disk at each lookup (nothing is cached)."""

    def __init__(self, store: WeightStore, names: list[str]):
        self._store, self._names = store, dict.fromkeys(names)

    @property
    def store(self) -> WeightStore:
        return self._store

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._names:
            raise KeyError(name)
        return self._store.get(name)

    def __contains__(self, name: object) -> bool:  # without reading the tensor (Mapping's default would)
        return name in self._names

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


class LazyQTensors(LazyTensors):
    """module path → QTensor, its parts read from disk at each lookup."""

    def __init__(
        self, store: WeightStore, entries: dict[str, dict], device: torch.device | str | None = None
    ):
        super().__init__(store, list(entries))
        self.entries = entries  # module -> its qform metadata entry (what its stored tensors are)
        self.device = None if device is None else torch.device(device)  # None: the QTensors stay on the host

    def _get(self, key: str) -> torch.Tensor | None:
        if key not in self._store:
            return None
        return self._store.get(key) if self.device is None else read_on_device(self._store, key, self.device)

    def info(self) -> dict[str, QInfo]:
        return {
            n: QInfo(
                QScheme(e["bits"], e["group_size"], e["symmetric"], "g_idx" in e["parts"], e["act_quant"]),
                *e["shape"],
            )
            for n, e in self.entries.items()
        }

    def __getitem__(self, name: str) -> QTensor:
        if name not in self._names:
            raise KeyError(name)
        src = str(self._store.file_of(f"{name}.qcodes"))
        return qtensor_from_entry(name, self.entries[name], self._get, src)
