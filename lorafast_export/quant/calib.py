"""Calibration data: text/jsonl files (or the bundled text) → `samples` windows of `seq_len` token ids.

Documents are tokenized with the merged model's own tokenizer and concatenated into one stream (each
document starts with the tokenizer's BOS when it adds one). The stream is cut into non-overlapping
windows of `seq_len` tokens and `samples` of them are picked with a seeded generator, so the same files,
tokenizer and seed always give the same tokens. Too little text is an error saying how much is needed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from lorafast_export.errors import InputError
from lorafast_export.paths import TEXT_DIR
from lorafast_export.recipe import CalibOptions
from lorafast_export.safeio import require_regular
from lorafast_export.textdata import read_texts, token_stream

DEFAULT_CALIB = TEXT_DIR / "calib.txt"


def read_calibration_texts(files: Sequence[str | Path]) -> list[str]:
    """Documents from .jsonl files (one {"text": ...} per line) or plain text files (one document each)."""
    texts: list[str] = []
    for p in calibration_files(files):
        texts += _read_one(p)
    return texts


def calibration_files(files: Sequence[str | Path]) -> list[Path]:
    """The files calibration reads (the bundled text when none are given), each checked to exist."""
    paths = [Path(f).expanduser() for f in files] or [DEFAULT_CALIB]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        hint = " (the bundled calibration text is missing from this install)" if not files else ""
        raise InputError(f"calibration file(s) not found{hint}: {', '.join(missing)}. Pass --calib FILE.")
    for p in paths:
        require_regular(p, "calibration file")  # never a FIFO or device: it would be read forever
    return paths


def _read_one(path: Path) -> list[str]:
    return read_texts(path, "calibration")


def select_windows(ids: torch.Tensor, samples: int, seq_len: int, seed: int, source: str) -> torch.Tensor:
    """Token stream [n] → [samples, seq_len] int64: `samples` distinct non-overlapping windows, picked by seed."""
    n_windows = len(ids) // seq_len
    if n_windows < samples:
        raise InputError(
            f"calibration data {source}: {samples} samples x {seq_len} tokens need {samples * seq_len} "
            f"tokens, but only {len(ids)} were found ({n_windows} windows of {seq_len}). Give more text "
            "(--calib FILE), or lower quant.calib.samples / quant.calib.seq_len."
        )
    stream = torch.as_tensor(ids[: n_windows * seq_len], dtype=torch.int64).view(n_windows, seq_len)
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(n_windows, generator=g)[:samples].sort().values
    return stream[pick].contiguous()


def load_calibration(merged_dir: str | Path, calib: CalibOptions | dict) -> torch.Tensor:
    """The calibration token ids [samples, seq_len] for the merged model in `merged_dir`."""
    from transformers import AutoTokenizer

    c = calib if isinstance(calib, CalibOptions) else CalibOptions(**calib)
    texts = read_calibration_texts(c.files)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(merged_dir))
    except (OSError, ValueError) as e:
        raise InputError(
            f"{merged_dir}: no usable tokenizer for calibration ({e}). The base model directory must "
            "contain its tokenizer files (tokenizer.json / tokenizer_config.json)."
        ) from None
    source = ", ".join(str(f) for f in c.files) or str(DEFAULT_CALIB)
    ids = token_stream(tokenizer, texts, limit=None)
    return select_windows(ids, c.samples, c.seq_len, c.seed, source)
