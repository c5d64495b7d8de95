"""User text files (eval and calibration data): UTF-8 text, or jsonl with a "text" field; and their tokens."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from lorafast_export.errors import InputError
from lorafast_export.safeio import require_regular


def read_texts(path: Path, what: str = "eval") -> list[str]:
    """A .jsonl file (one {"text": ...} per line) or any other file as one UTF-8 text."""
    require_regular(path, f"{what} file")  # a FIFO or /dev/zero would be read until memory runs out
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InputError(
            f"{path}: not UTF-8 text (byte {e.start}); convert it with iconv or pass another file."
        ) from None
    if path.suffix == ".jsonl":
        texts = []
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except (json.JSONDecodeError, RecursionError):
                raise InputError(
                    f"{path}:{n}: not valid JSON; each line must be an object with a 'text' field."
                ) from None
            if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                raise InputError(f"{path}:{n}: each line needs a string 'text' field.")
            texts.append(rec["text"])
    else:
        texts = [raw]
    if not any(t.strip() for t in texts):
        raise InputError(f"{path}: {what} file is empty.")
    return texts


# A document longer than this is tokenized in pieces: a fast tokenizer keeps offsets, words and alignments for
# every token of its input (about 170 bytes per character: a 30 MB line took 5 GB). Shorter documents, like the
# bundled eval and calibration texts, are tokenized whole, exactly as before.
CHUNK_CHARS = 1 << 18
_CUT_WINDOW = 4096  # how far back from the chunk's end to look for a word boundary


def token_ids(tokenizer, text: str, chunk_chars: int = CHUNK_CHARS) -> Iterator[list[int]]:
    """The document's token ids (with the tokenizer's special tokens, e.g. BOS), in pieces of bounded memory.

    A long document is cut just before a space that follows a non-space and precedes a word, where byte-level BPE
    (GPT-2, Llama 3, Qwen2) and SentencePiece-style tokenizers start a new token anyway, so the pieces tokenize as
    the whole would; a run with no such space is cut at the limit."""
    if len(text) <= chunk_chars:
        yield tokenizer(text, verbose=False)["input_ids"]
        return
    prefix, suffix = _special_tokens(tokenizer)
    yield prefix
    start = 0
    while start < len(text):
        end = _cut(text, start, chunk_chars)
        yield tokenizer(text[start:end], add_special_tokens=False, verbose=False)["input_ids"]
        start = end
    yield suffix


def _cut(text: str, start: int, chunk_chars: int) -> int:
    end = start + chunk_chars
    if end >= len(text):
        return len(text)
    for i in range(end, max(start + 1, end - _CUT_WINDOW), -1):
        if text[i] == " " and not text[i - 1].isspace() and not text[i + 1].isspace():
            return i
    return end


def _special_tokens(tokenizer) -> tuple[list[int], list[int]]:
    """The ids the tokenizer adds before and after a text (e.g. [BOS], []), found by tokenizing one word."""
    plain = tokenizer("a", add_special_tokens=False, verbose=False)["input_ids"]
    full = tokenizer("a", verbose=False)["input_ids"]
    for i in range(len(full) - len(plain) + 1):
        if full[i : i + len(plain)] == plain:
            return full[:i], full[i + len(plain) :]
    return [], []


def token_stream(
    tokenizer, texts: Iterable[str], limit: int | None = None, skip_blank: bool = True
) -> torch.Tensor:
    """Concatenated token ids [n] int64 of the documents (blank ones skipped unless skip_blank=False); stops once
    `limit` tokens are reached (n may then exceed limit). Memory: one piece of tokenizer work + 8 bytes a token."""
    parts, n = [], 0
    for text in texts:
        if skip_blank and not text.strip():
            continue
        for ids in token_ids(tokenizer, text):
            parts.append(np.asarray(ids, dtype=np.int64))
            n += len(ids)
            if limit is not None and n >= limit:
                return torch.from_numpy(np.concatenate(parts))
    return torch.from_numpy(np.concatenate(parts)) if parts else torch.empty(0, dtype=torch.int64)
