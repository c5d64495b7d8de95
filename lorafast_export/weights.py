"""Safe loading of base model weights.

safetensors only by default (read tensor by tensor with positional reads, not memory-mapped); pickle checkpoints (.bin/.pt) are refused
unless the user passes --allow-pickle, and then read with torch.load(weights_only=True). No remote code is
ever run: we read config.json ourselves and never call trust_remote_code paths.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lorafast_export.errors import InputError
from lorafast_export.model.spec import EMBED, FINAL_NORM, LM_HEAD, ModelConfig, layer_prefix
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
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
_COPY_CHUNK = 64 << 20


def check_safetensors_header(path: Path) -> dict:
    """Validate a safetensors file's framing before reading it; return the header. Names the file on error."""
    return read_safetensors_header(path)[1]


def read_safetensors_header(path: Path) -> tuple[int, dict]:
    """(byte offset where tensor data starts, header): every entry checked as the safetensors library checks it
    (types, dtype, shape x dtype = byte span, spans inside the file, neither overlapping nor leaving gaps)."""
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
            header = json.loads(f.read(n), object_pairs_hook=_no_duplicate_keys)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            raise InputError(
                f"{path}: corrupt safetensors header (not JSON). Re-save the checkpoint."
            ) from None
        except _DuplicateKey as e:
            raise InputError(f"{path}: corrupt safetensors header: {e} is listed twice.") from None
    if not isinstance(header, dict):
        raise InputError(
            f"{path}: corrupt safetensors header: a JSON object (tensor name -> entry) is required, "
            f"got a JSON {_json_type(header)}. Re-save the checkpoint with safetensors."
        )
    _check_metadata(path, header.get("__metadata__"))
    spans = sorted(
        (_entry_span(path, name, info), name) for name, info in header.items() if name != "__metadata__"
    )
    _check_spans(path, spans, size - 8 - n)
    return 8 + n, header


class _DuplicateKey(Exception):
    pass


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    seen: dict = {}
    for k, v in pairs:
        if k in seen:
            raise _DuplicateKey(repr(k))
        seen[k] = v
    return seen


def _json_type(v: object) -> str:
    names = {list: "array", str: "string", bool: "boolean", int: "number", float: "number", dict: "object"}
    return names.get(type(v), "null")


def _is_count(v: object) -> bool:
    """A JSON integer >= 0 (true/false and "12" are not)."""
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _check_metadata(path: Path, meta: object) -> None:
    if meta is None:
        return
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise InputError(
            f"{path}: corrupt safetensors header: '__metadata__' must map names to strings; re-save the file."
        )


def _entry_span(path: Path, name: str, info: object) -> tuple[int, int]:
    """(start, end) of a tensor's bytes, after checking its entry's types and that the span fits its shape."""
    where = f"{path}: tensor {name!r}"
    if not isinstance(info, dict):
        raise InputError(
            f"{where}: header entry is a JSON {_json_type(info)}, not an object; re-save the file."
        )
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in _ST_DTYPES:
        raise InputError(f"{where}: dtype {dtype!r} is not one of {', '.join(_ST_DTYPES)}.")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise InputError(f"{where}: shape {json.dumps(shape)} is not a list of non-negative integers.")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
        raise InputError(
            f"{where}: data_offsets {json.dumps(offsets)} is not [start, end] (two non-negative integers)."
        )
    start, end = offsets
    want = math.prod(shape) * _ST_DTYPES[dtype].itemsize
    if end - start != want:
        raise InputError(
            f"{where}: data_offsets [{start}, {end}] hold {end - start} bytes, but shape {tuple(shape)} x {dtype} "
            f"needs {want}. The header does not describe the data; re-save the checkpoint."
        )
    return start, end


def _check_spans(path: Path, spans: list[tuple[tuple[int, int], str]], data_bytes: int) -> None:
    """Tensor byte spans tile the data section exactly, as the safetensors library requires."""
    pos, prev = 0, None
    for (start, end), name in spans:
        if start < pos:
            raise InputError(
                f"{path}: corrupt safetensors header: tensors {prev!r} and {name!r} share bytes "
                f"(overlapping data_offsets). Re-save the checkpoint."
            )
        if start > pos:
            raise InputError(
                f"{path}: corrupt safetensors header: bytes {pos}..{start} before tensor {name!r} belong to no "
                "tensor (the safetensors library refuses such files). Re-save the checkpoint."
            )
        pos, prev = end, name
    if pos > data_bytes:
        raise InputError(
            f"{path}: truncated: tensors need {pos} data bytes but the file has {data_bytes}. "
            "The download or copy was probably interrupted; fetch it again."
        )
    if pos < data_bytes:
        raise InputError(
            f"{path}: corrupt safetensors file: {data_bytes - pos} bytes after the last tensor belong to no "
            "tensor (the safetensors library refuses such files). Re-save the checkpoint."
        )


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
        base, header = read_safetensors_header(f)
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if name in self._where:  # shards that disagree on a tensor: neither can be trusted
                raise InputError(
                    f"{f}: tensor {name!r} is also in {self._where[name]}; a checkpoint holds each tensor once. "
                    "Remove the stale shard (an older download?)."
                )
            start, end = info["data_offsets"]
            self._entries[name] = _Entry(
                f, base + start, end - start, _ST_DTYPES[info["dtype"]], tuple(info["shape"])
            )
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

    def span_of(self, name: str) -> tuple[Path, int, int, torch.dtype, tuple[int, ...]] | None:
        """(file, byte offset, byte count, dtype, shape) of a safetensors tensor, for readers that fill their own
        buffers (validate/resident.py reads into pinned memory); None for a pickled one."""
        e = self._entries.get(name)
        return None if e is None else (e.path, e.offset, e.nbytes, e.dtype, e.shape)

    def shape_of(self, name: str) -> tuple[int, ...]:
        if name in self._pickled:
            return tuple(self._pickled[name].shape)
        return self._entries[name].shape

    def dtype_of(self, name: str) -> torch.dtype:
        if name in self._pickled:
            return self._pickled[name].dtype
        return self._entries[name].dtype

    def file_of(self, name: str) -> Path:
        return self._where[name]

    def copy_to(
        self,
        path: Path,
        names: list[str],
        metadata: dict[str, str] | None = None,
        extra: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Write the named tensors, as stored, into one new safetensors file, copying their bytes in chunks:
        the tensors are never all in memory (a saved quantized model's codes at 8B are 3.5 GB). extra: tensors
        from memory (CPU, contiguous) written after them."""
        entries = [self._entries[n] for n in names]
        extra = extra or {}
        header: dict = {"__metadata__": metadata} if metadata else {}
        pos = 0
        for n, dtype, shape, nbytes in [
            (n, e.dtype, e.shape, e.nbytes) for n, e in zip(names, entries, strict=True)
        ] + [(n, t.dtype, t.shape, t.numel() * t.element_size()) for n, t in extra.items()]:
            header[n] = {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
            pos += nbytes
        head = json.dumps(header, separators=(",", ":")).encode()
        head += b" " * (
            -len(head) % 8
        )  # the data starts 8-byte aligned, as the safetensors library writes it
        with open(path, "wb") as out:
            out.write(struct.pack("<Q", len(head)) + head)
            for e in entries:
                with open(e.path, "rb") as src:
                    src.seek(e.offset)
                    left = e.nbytes
                    while left:
                        chunk = src.read(min(left, _COPY_CHUNK))
                        if not chunk:
                            raise InputError(f"{e.path}: truncated while copying; the file is incomplete.")
                        out.write(chunk)
                        left -= len(chunk)
            for t in extra.values():
                if t.numel():
                    out.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))


def _read_weight_map(idx: Path) -> dict[str, str]:
    """The index's weight_map (tensor name -> shard file name), checked to be an object of strings."""
    try:
        weight_map = json.loads(read_text(idx, "shard index", LIMITS["index"]))["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, KeyError, TypeError):
        raise InputError(f"{idx}: not a valid safetensors index (needs a 'weight_map' object).") from None
    if not isinstance(weight_map, dict):
        raise InputError(f"{idx}: 'weight_map' must be an object (tensor name -> shard file name).")
    bad = [k for k, v in weight_map.items() if not isinstance(v, str) or not v]
    if bad:
        raise InputError(
            f"{idx}: weight_map[{bad[0]!r}] is {json.dumps(weight_map[bad[0]])}, not a shard file name"
            + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else "")
            + "; each value must be the name of a .safetensors file beside the index."
        )
    return weight_map


def _weight_files(d: Path, allow_pickle: bool) -> list[Path]:
    idx = d / "model.safetensors.index.json"
    if idx.exists():
        weight_map = _read_weight_map(idx)
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


def check_tokenizer(model: ModelDir, why: str) -> None:
    """The base's tokenizer loads (checked when the inputs are opened, not when validation first needs it)."""
    import transformers

    if not model.tokenizer_files:
        raise InputError(
            f"{model.path}: no tokenizer files (tokenizer.json / tokenizer_config.json); {why} needs the base "
            "model's tokenizer. Copy them from the model's original download."
        )
    try:
        transformers.AutoTokenizer.from_pretrained(model.path)
    except Exception as e:  # noqa: BLE001 - any failure to load is the tokenizer files' fault; name them
        raise InputError(
            f"{model.path}: the tokenizer does not load ({type(e).__name__}: {str(e)[:300]}); {why} needs it. "
            "Replace the tokenizer files with the model's original ones."
        ) from None


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
    last = f"{layer_prefix(cfg.num_layers - 1)}self_attn.q_proj.weight"
    if last not in store:  # before listing every tensor of num_hidden_layers layers (it may say 10**9)
        have = sum(1 for k in store.keys() if k.endswith("self_attn.q_proj.weight"))
        raise InputError(
            f"{d}: config.json says num_hidden_layers={cfg.num_layers}, but the checkpoint has {have} "
            f"layer(s) ({last} is missing). Fix config.json, or complete the checkpoint."
        )
    need = expected_shapes(cfg)
    missing = [n for n in need if n not in store]
    if missing:
        shown = ", ".join(missing[:5]) + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else "")
        raise InputError(
            f"{d}: checkpoint lacks tensor(s) {shown} required by its config.json "
            f"({cfg.family}, {cfg.num_layers} layers). Is the checkpoint complete?"
        )
    wrong = [(n, store.shape_of(n), s) for n, s in need.items() if tuple(store.shape_of(n)) != s]
    if wrong:
        lines = [f"{n} is {tuple(got)}, config.json implies {want}" for n, got, want in wrong[:5]]
        more = f"\n  (+{len(wrong) - 5} more)" if len(wrong) > 5 else ""
        raise InputError(
            f"{d}: config.json does not match the tensors ({_config_summary(cfg)}):\n  - "
            + "\n  - ".join(lines)
            + more
            + "\nFix config.json (or the checkpoint): transformers cannot load a model whose shapes disagree."
        )


def _config_summary(cfg: ModelConfig) -> str:
    return (
        f"vocab_size={cfg.vocab_size}, hidden_size={cfg.hidden_size}, intermediate_size={cfg.intermediate_size}, "
        f"num_attention_heads={cfg.num_heads}, num_key_value_heads={cfg.num_kv_heads}, head_dim={cfg.head_dim}"
    )


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint of this config must hold, with the shape transformers builds for it."""
    h, q, kv, inter = (
        cfg.hidden_size,
        cfg.num_heads * cfg.head_dim,
        cfg.num_kv_heads * cfg.head_dim,
        cfg.intermediate_size,
    )
    out = {EMBED: (cfg.vocab_size, h), FINAL_NORM: (h,)}
    if not cfg.tie_word_embeddings:
        out[LM_HEAD] = (cfg.vocab_size, h)
    linear = {
        "self_attn.q_proj": (q, h),
        "self_attn.k_proj": (kv, h),
        "self_attn.v_proj": (kv, h),
        "self_attn.o_proj": (h, q),
        "mlp.gate_proj": (inter, h),
        "mlp.up_proj": (inter, h),
        "mlp.down_proj": (h, inter),
    }
    for i in range(cfg.num_layers):
        p = layer_prefix(i)
        out.update({f"{p}{m}.weight": s for m, s in linear.items()})
        out.update({f"{p}input_layernorm.weight": (h,), f"{p}post_attention_layernorm.weight": (h,)})
        if cfg.qkv_bias:
            out.update(
                {
                    f"{p}self_attn.{m}.bias": (linear[f"self_attn.{m}"][0],)
                    for m in ("q_proj", "k_proj", "v_proj")
                }
            )
        if cfg.o_bias:
            out[f"{p}self_attn.o_proj.bias"] = (h,)
        if cfg.mlp_bias:
            out.update(
                {f"{p}{m}.bias": (linear[m][0],) for m in ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
            )
    return out
