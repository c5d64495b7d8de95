"""Reading user text files (eval and calibration data): UTF-8 text, or jsonl with a "text" field."""

from __future__ import annotations

import json
from pathlib import Path

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
            except json.JSONDecodeError:
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
