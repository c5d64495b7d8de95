"""Batch generation over a prompt file: the job people run most with a fine-tuned model.

Reads jsonl prompts ({"prompt": ..., optional "id", "max_new_tokens"}), generates greedily through the artifact's
own runtime session (continuous batching when the session offers `generate_batch`, e.g. the torch-compile
runtime; one prompt at a time otherwise), and appends one jsonl record per prompt, flushed as it goes. An
interrupted run resumes: records already in the output (complete lines) are skipped; a torn last line is cut.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from lorafast_export.errors import InputError


def read_prompts(path: Path) -> Iterator[tuple[int, dict]]:
    if not path.is_file():
        raise InputError(f"{path}: prompt file not found.")
    with open(path, encoding="utf-8", errors="strict") as f:
        try:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    raise InputError(
                        f'{path}:{n}: not valid JSON; each line must be {{"prompt": ...}}.'
                    ) from None
                if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str):
                    raise InputError(f"{path}:{n}: each line needs a string 'prompt' field.")
                yield n, rec
        except UnicodeDecodeError:
            raise InputError(f"{path}: not UTF-8 text.") from None


def completed_ids(out: Path) -> set:
    """ids already written; a torn (partial) last line from a killed run is truncated away."""
    if not out.exists():
        return set()
    data = out.read_bytes()
    keep = data.rfind(b"\n") + 1
    if keep != len(data):
        with open(out, "r+b") as f:
            f.truncate(keep)
    done = set()
    for line in data[:keep].decode("utf-8").splitlines():
        if line.strip():
            done.add(json.loads(line)["id"])
    return done


def generate_file(
    artifact: Path,
    inp: Path,
    out: Path,
    max_new_tokens: int,
    batch_size: int = 16,
    progress: Callable[[int, int], None] = lambda done, total: None,
) -> dict:
    import transformers

    from lorafast_export.pipeline import artifact_target

    target = artifact_target(artifact)
    session = target.load(artifact / "model")
    tok = transformers.AutoTokenizer.from_pretrained(artifact / "model")
    done = completed_ids(out)
    todo = [(rec.get("id", n), rec) for n, rec in read_prompts(inp)]
    pending = [(i, r) for i, r in todo if i not in done]
    progress(len(todo) - len(pending), len(todo))
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a", encoding="utf-8") as f:
        for start in range(0, len(pending), batch_size):
            chunk = pending[start : start + batch_size]
            ids = [tok(r["prompt"])["input_ids"] for _, r in chunk]
            budgets = [int(r.get("max_new_tokens", max_new_tokens)) for _, r in chunk]
            outs = _generate(session, ids, budgets)
            for (i, r), toks in zip(chunk, outs, strict=True):
                toks = _until_eos(toks, tok.eos_token_id)
                f.write(
                    json.dumps(
                        {"id": i, "prompt": r["prompt"], "completion": tok.decode(toks), "tokens": toks}
                    )
                    + "\n"
                )
            f.flush()
            os.fsync(f.fileno())
            progress(len(todo) - len(pending) + start + len(chunk), len(todo))
    return {
        "prompts": len(todo),
        "generated": len(pending),
        "resumed_from": len(todo) - len(pending),
        "output": str(out),
    }


def _generate(session, ids: list[list[int]], budgets: list[int]) -> list[list[int]]:
    if hasattr(session, "generate_batch"):
        return session.generate_batch(ids, budgets)
    return [session.generate(p, n) for p, n in zip(ids, budgets, strict=True)]


def _until_eos(toks: list[int], eos) -> list[int]:
    eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
    for k, t in enumerate(toks):
        if t in eos_ids:
            return toks[:k]
    return toks
