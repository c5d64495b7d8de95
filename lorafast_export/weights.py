"""Safe loading of base model weights.

safetensors only by default (memory-mapped, read tensor by tensor); pickle checkpoints (.bin/.pt) are refused
unless the user passes --allow-pickle, and then read with torch.load(weights_only=True). No remote code is
ever run: we read config.json ourselves and never call trust_remote_code paths.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lorafast_export.errors import InputError
from lorafast_export.model.spec import ModelConfig
from lorafast_export.safeio import (
    LIMITS,
    read_text,
    require_regular,
    sha256_file,  # noqa: F401 - re-exported: callers import it from here
)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "generation_config.json",
)


def check_safetensors_header(path: Path) -> dict:
    """Validate a safetensors file's framing before reading it; return the header. Names the file on error."""
    size = require_regular(path, "safetensors file").st_size
    if size == 0:
        raise InputError(f"{path}: file is empty. Re-download or re-save the checkpoint.")
    if size < 8:
        raise InputError(f"{path}: truncated ({size} bytes); not a safetensors file.")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > size - 8 or n > 100_000_000:
            raise InputError(
                f"{path}: corrupt safetensors header (declares {n} header bytes, file has {size})."
            )
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise InputError(
                f"{path}: corrupt safetensors header (not JSON). Re-save the checkpoint."
            ) from None
    end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise InputError(
            f"{path}: truncated: tensors need {8 + n + end} bytes but the file has {size}. "
            "The download or copy was probably interrupted; fetch it again."
        )
    return header


_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


@dataclass(frozen=True)
class _Entry:
    path: Path
    offset: int  # absolute byte offset of the tensor's data in the file
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


class WeightStore:
    """Name → tensor access over one checkpoint (single or sharded safetensors, or pickle if allowed).

    safetensors are read tensor by tensor with positional reads, not memory-mapped: a tensor's memory is freed as
    soon as the caller drops it, so streaming a model larger than RAM keeps the process's RSS at what is alive.
    """

    def __init__(self, files: list[Path], allow_pickle: bool = False):
        self.files = files
        self._where: dict[str, Path] = {}
        self._entries: dict[str, _Entry] = {}
        self._pickled: dict[str, torch.Tensor] = {}
        for f in files:
            if f.suffix in PICKLE_SUFFIXES:
                self._load_pickle(f, allow_pickle)
                continue
            self._index(f)

    def _index(self, f: Path) -> None:
        header = check_safetensors_header(f)
        with open(f, "rb") as fh:
            base = 8 + struct.unpack("<Q", fh.read(8))[0]
        for name, info in header.items():
            if name == "__metadata__":
                continue
            try:
                dtype = _ST_DTYPES[info["dtype"]]
                start, end = (int(x) for x in info["data_offsets"])
                shape = tuple(int(x) for x in info["shape"])
            except (KeyError, TypeError, ValueError):
                raise InputError(f"{f}: tensor {name!r} has a malformed header entry ({info!r}).") from None
            if end - start != torch.Size(shape).numel() * dtype.itemsize:
                raise InputError(
                    f"{f}: tensor {name!r}: header size does not match shape {shape} x {info['dtype']}."
                )
            self._entries[name] = _Entry(f, base + start, end - start, dtype, shape)
            self._where[name] = f

    def _load_pickle(self, f: Path, allow_pickle: bool) -> None:
        if not allow_pickle:
            raise InputError(
                f"{f}: pickle checkpoints can run arbitrary code and are refused by default. "
                "Convert it to safetensors, or pass --allow-pickle to read it with torch.load(weights_only=True)."
            )
        require_regular(f, "pickle checkpoint")
        try:
            sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # noqa: BLE001 - re-raised as InputError naming the file
            raise InputError(
                f"{f}: cannot be loaded with weights_only=True ({type(e).__name__}: {e})."
            ) from None
        for k, v in sd.items():
            self._pickled[k] = v
            self._where[k] = f

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise InputError(f"tensor {name!r} not found in {', '.join(str(f) for f in self.files)}.")
        if name in self._pickled:
            return self._pickled[name]
        e = self._entries[name]
        buf = bytearray(e.nbytes)
        with open(e.path, "rb") as fh:
            fh.seek(e.offset)
            if fh.readinto(buf) != e.nbytes:
                raise InputError(f"{e.path}: tensor {name!r} is truncated; the file is incomplete.")
        if not e.nbytes:
            return torch.empty(e.shape, dtype=e.dtype)
        return torch.frombuffer(buf, dtype=e.dtype).reshape(e.shape)

    def shape_of(self, name: str) -> tuple[int, ...]:
        if name in self._pickled:
            return tuple(self._pickled[name].shape)
        return self._entries[name].shape

    def file_of(self, name: str) -> Path:
        return self._where[name]


def _weight_files(d: Path, allow_pickle: bool) -> list[Path]:
    idx = d / "model.safetensors.index.json"
    if idx.exists():
        try:
            weight_map = json.loads(read_text(idx, "shard index", LIMITS["index"]))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise InputError(f"{idx}: not a valid safetensors index (needs a 'weight_map' object).") from None
        _check_shards_inside(idx, weight_map)
        files = sorted({d / v for v in weight_map.values()})
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise InputError(f"{idx} names shard(s) that do not exist: {', '.join(missing)}.")
        return files
    single = sorted(d.glob("*.safetensors"))
    if single:
        return single
    pickled = sorted(p for p in d.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickled:
        if not allow_pickle:
            raise InputError(
                f"{d}: only pickle checkpoints ({', '.join(p.name for p in pickled)}) found; they are refused "
                "by default. Convert to safetensors or pass --allow-pickle (read with weights_only=True)."
            )
        return pickled
    raise InputError(f"{d}: no model weights found (expected model.safetensors or a sharded index).")


@dataclass
class ModelDir:
    path: Path
    config: ModelConfig
    store: WeightStore
    tokenizer_files: list[Path] = field(default_factory=list)

    @property
    def config_path(self) -> Path:
        return self.path / "config.json"


def open_model(path: str | Path, allow_pickle: bool = False) -> ModelDir:
    d = Path(path)
    if not d.is_dir():
        raise InputError(f"{d}: base model directory not found.")
    cfg = ModelConfig.from_file(d / "config.json")
    store = WeightStore(_weight_files(d, allow_pickle), allow_pickle)
    _check_base_tensors(d, cfg, store)
    return ModelDir(d, cfg, store, tokenizer_files(d))


def tokenizer_files(d: Path) -> list[Path]:
    """The tokenizer (and generation config) files a checkpoint directory has: regular files of a sane size."""
    found = [d / n for n in TOKENIZER_FILES if (d / n).exists()]
    for f in found:
        if require_regular(f, "tokenizer file").st_size > LIMITS["tokenizer"]:
            raise InputError(f"{f}: larger than {LIMITS['tokenizer']:,} bytes; not a tokenizer file.")
    return found


def _check_shards_inside(idx: Path, weight_map: dict) -> None:
    """Shards named by the index lie in the model directory (links inside it, as the Hub cache makes, are fine)."""
    bad = [
        v
        for v in weight_map.values()
        if isinstance(v, str) and (Path(v).is_absolute() or v.startswith("~") or ".." in Path(v).parts)
    ]
    if bad:
        raise InputError(
            f"{idx}: weight_map names shard(s) outside the model directory ({', '.join(map(repr, sorted(set(bad))))}); "
            "an index names files beside it. Fix the index or copy the shards into the directory."
        )


def _check_base_tensors(d: Path, cfg: ModelConfig, store: WeightStore) -> None:
    from lorafast_export.model.spec import EMBED, FINAL_NORM, LM_HEAD, linear_module_names

    need = [EMBED, FINAL_NORM] + ([] if cfg.tie_word_embeddings else [LM_HEAD])
    for i in range(cfg.num_layers):
        need += [f"{m}.weight" for m in linear_module_names(i)]
    missing = [n for n in need if n not in store]
    if missing:
        shown = ", ".join(missing[:5]) + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else "")
        raise InputError(
            f"{d}: checkpoint lacks tensor(s) {shown} required by its config.json "
            f"({cfg.family}, {cfg.num_layers} layers). Is the checkpoint complete?"
        )
