"""Writing Hugging Face-style checkpoints shard by shard (safetensors + index), from a stream of tensor groups."""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

DEFAULT_SHARD_BYTES = 512 * 1024**2


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    """safetensors' save_file, with a failed write (disk full, file-size limit) raised as the OSError it is,
    naming the file (the library's own error carries only the OS error's number)."""
    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as e:
        m = re.search(r"\(os error (\d+)\)", str(e))
        if m is None:
            raise
        code = int(m.group(1))
        raise OSError(code, os.strerror(code), str(path)) from None


class ShardWriter:
    """Buffers tensors until a shard is full, then writes it. Shards get final names in `finish()`."""

    def __init__(
        self, out_dir: Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES, metadata: dict | None = None
    ):
        self.out_dir = out_dir
        self.max_bytes = max_shard_bytes
        self.metadata = {"format": "pt", **(metadata or {})}
        self._buf: dict[str, torch.Tensor] = {}
        self._buf_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, t in tensors.items():
            n = t.numel() * t.element_size()
            if self._buf and self._buf_bytes + n > self.max_bytes:
                self._flush()
            self._buf[name] = t.contiguous()
            self._buf_bytes += n
            self.total_bytes += n

    def _flush(self) -> None:
        path = self.out_dir / f".shard-{len(self._shards):05d}.safetensors"
        save_safetensors(self._buf, path, self.metadata)
        self._shards.append((path, list(self._buf)))
        self._buf, self._buf_bytes = {}, 0

    def finish(self) -> list[Path]:
        if self._buf or not self._shards:
            self._flush()
        n = len(self._shards)
        if n == 1:
            final = self.out_dir / "model.safetensors"
            self._shards[0][0].rename(final)
            return [final]
        weight_map, paths = {}, []
        for i, (tmp, names) in enumerate(self._shards):
            final = self.out_dir / f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            tmp.rename(final)
            paths.append(final)
            weight_map.update({k: final.name for k in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return paths


def write_checkpoint(
    groups: Iterable[tuple[str, dict[str, torch.Tensor]]],
    out_dir: Path,
    config: dict,
    tokenizer_files: list[Path],
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    on_group=None,
) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(out_dir, max_shard_bytes)
    for name, tensors in groups:
        writer.add(tensors)
        if on_group is not None:
            on_group(name)
    files = writer.finish()
    write_side_files(out_dir, config, tokenizer_files)
    return files


def write_side_files(out_dir: Path, config: dict, tokenizer_files: list[Path]) -> None:
    """config.json and the tokenizer files: a checkpoint directory without its weights."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for f in tokenizer_files:
        shutil.copy2(f, out_dir / f.name)
