"""Eval data: text or jsonl files (or the bundled default) → token blocks; generation prompts → token ids."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from lorafast_export.errors import InputError
from lorafast_export.paths import TEXT_DIR
from lorafast_export.textdata import read_texts, token_stream

DEFAULT_EVAL = {"prose": TEXT_DIR / "prose_eval.txt", "code": TEXT_DIR / "code_eval.txt"}
DEFAULT_PROMPTS = TEXT_DIR / "prompts.jsonl"


@dataclass
class EvalSet:
    name: str
    source: str
    blocks: list[torch.Tensor]  # each [block_size] token ids; labels are the block shifted by one

    @property
    def tokens(self) -> int:
        return sum(len(b) - 1 for b in self.blocks)

    def digest(self) -> str:
        h = hashlib.sha256()
        for b in self.blocks:
            h.update(b.to(torch.int64).numpy().tobytes())
        return h.hexdigest()


def tokenize_blocks(tokenizer, texts: list[str], block_size: int, max_tokens: int) -> list[torch.Tensor]:
    """Concatenate documents (BOS-separated when the tokenizer adds one) and cut into full blocks."""
    ids = token_stream(tokenizer, texts, limit=max_tokens + block_size, skip_blank=False)  # in bounded pieces
    n_blocks = min(len(ids) // block_size, max(1, max_tokens // (block_size - 1)))
    return [ids[i * block_size : (i + 1) * block_size].clone() for i in range(n_blocks)]


def load_eval_sets(
    tokenizer, specs: list[tuple[str, Path]], block_size: int, max_tokens: int
) -> list[EvalSet]:
    out = []
    for name, path in specs or list(DEFAULT_EVAL.items()):
        blocks = tokenize_blocks(tokenizer, read_texts(Path(path)), block_size, max_tokens)
        if not blocks:
            raise InputError(
                f"{path}: eval set {name!r} has fewer than one block of {block_size} tokens; "
                "give more text or a smaller validate.block_size."
            )
        out.append(EvalSet(name, str(path), blocks))
    return out


def load_prompts(tokenizer, path: Path | None) -> list[list[int]]:
    """Prompts for greedy-generation checks: jsonl with a "prompt" field, or one prompt per line of text."""
    path = Path(path) if path else DEFAULT_PROMPTS
    prompts = []
    for n, line in enumerate(
        read_texts(path, "prompts")[0].splitlines() if path.suffix != ".jsonl" else _lines(path), 1
    ):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                line = json.loads(line)["prompt"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise InputError(f"{path}:{n}: each line must be an object with a 'prompt' field.") from None
        prompts.append(tokenizer(line)["input_ids"])
    if not prompts:
        raise InputError(f"{path}: no prompts found.")
    return prompts


def _lines(path: Path) -> list[str]:
    if not path.exists():
        raise InputError(f"{path}: prompts file not found.")
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise InputError(f"{path}: not UTF-8 text.") from None
