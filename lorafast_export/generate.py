"""Batch generation over a prompt file: the job people run most with a fine-tuned model.

Reads jsonl prompts ({"prompt": ..., optional "id", "max_new_tokens"}), generates greedily through the artifact's
own runtime session (continuous batching when the session offers `generate_batch`, e.g. the torch-compile
runtime; one prompt at a time otherwise), and writes one jsonl record per prompt.

The output is never written in place: records go to `.<name>.partial-PID` beside it (the existing records first,
then each batch, flushed), renamed over the output when the run ends, is interrupted (Ctrl-C, SIGTERM) or fails.
A run killed outright leaves its partial; the next run resumes from it. Records already there (complete lines)
are skipped; a torn last line is dropped. An existing output that is not a generate output, or that is the
input itself (also through a link), is refused before anything is written.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from lorafast_export.errors import InputError
from lorafast_export.outdir import output_lock
from lorafast_export.safeio import create_new, dead_partials, require_regular


def read_prompts(path: Path) -> Iterator[tuple[int, dict]]:
    require_regular(path, "prompt file")
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
                if not isinstance(rec.get("id", 0), (int, str)) or isinstance(rec.get("id"), bool):
                    raise InputError(f"{path}:{n}: 'id' must be a string or an integer.")
                yield n, rec
        except UnicodeDecodeError:
            raise InputError(f"{path}: not UTF-8 text.") from None


def completed(path: Path) -> tuple[bytes, set]:
    """(complete lines, their ids) of an earlier output; a torn last line is left out. Only read, never changed."""
    if not path.exists() and not path.is_symlink():
        return b"", set()
    require_regular(path, "output file")
    data = path.read_bytes()
    data = data[: data.rfind(b"\n") + 1]
    done = set()
    for n, line in enumerate(data.split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            rec = None
        if not isinstance(rec, dict) or not isinstance(rec.get("id"), (int, str)):
            raise InputError(
                f"{path}:{n}: not a generate output (each line is a JSON record with an 'id'); it was not "
                "changed. Choose another --output."
            )
        done.add(rec["id"])
    return data, done


def _refuse_same_file(inp: Path, out: Path) -> None:
    if out.exists() and inp.exists() and os.path.samefile(inp, out):
        raise InputError(
            f"{out}: --output is the --input file ({inp}){' through a link' if inp != out else ''}; writing it "
            "would destroy the prompts. Choose another --output."
        )


def _resume_from(out: Path) -> tuple[bytes, set, list[Path]]:
    """The earlier records (the output's, or a killed run's partial when that holds more), and the partials of
    dead runs, to remove once those records are safe in ours."""
    stale = dead_partials(out.parent, f".{out.name}.")
    best = completed(out)
    for p in stale:
        try:
            data, done = completed(p)
        except InputError:
            continue
        if len(done) > len(best[1]):
            best = (data, done)
    return *best, stale


def _session(
    target,
    artifact: Path,
    draft: Path | None,
    draft_int4: bool = False,
    options: dict | None = None,
    device: str = "cpu",
    batch_size: int | None = None,
):
    """The artifact's runtime session; with a draft artifact, speculative (torch-compile only); draft_int4: the
    draft's linears quantized to int4 at load (`--speculative int4`: the artifact as its own draft); options: the
    torch-compile runtime's options for this session (`--runtime-option`)."""
    kw = dict(options or {})
    refused = (
        [f"--runtime-option {', '.join(kw)}: runtime options are the torch-compile runtime's"] if kw else []
    )
    if draft is not None:
        what = "--speculative int4" if draft_int4 else f"--draft {draft}"
        refused.append(f"{what}: speculative decoding runs on torch-compile artifacts")
        kw.update(draft=draft, draft_int4=draft_int4)
    if refused and target.name != "torch-compile":
        raise InputError(
            f"{artifact} is a {target.name} artifact; {'; '.join(refused)} (build with --target torch-compile), "
            "or drop them."
        )
    if target.name == "torch-compile" and batch_size and "max_batch" not in kw:
        # no step holds more rows than a batch of the file: its runtime warms (compiles and captures) no larger
        # bucket (at 8B a runtime with a draft warmed 6 buckets x 8 table widths x 5 shapes at load); an artifact
        # built with a smaller max_batch keeps it
        from lorafast_export.runtime.artifact import read_meta
        from lorafast_export.runtime.options import RuntimeOptions

        built = RuntimeOptions.from_dict(read_meta(artifact / "model")["options"]).max_batch
        kw["max_batch"] = min(built, batch_size)
    return target.load(artifact / "model", device, **kw)


def generate_file(
    artifact: Path,
    inp: Path,
    out: Path,
    max_new_tokens: int,
    batch_size: int = 16,
    progress: Callable[[int, int], None] = lambda done, total: None,
    draft: Path | None = None,
    draft_int4: bool = False,
    options: dict | None = None,
    device: str = "cpu",
) -> dict:
    import transformers

    from lorafast_export.pipeline import artifact_target

    _refuse_same_file(inp, out)
    todo = [(rec.get("id", n), rec) for n, rec in read_prompts(inp)]
    completed(out)  # an output that is not ours is refused before the model is loaded
    session = _session(artifact_target(artifact), artifact, draft, draft_int4, options, device, batch_size)
    tok = transformers.AutoTokenizer.from_pretrained(artifact / "model")
    out.parent.mkdir(parents=True, exist_ok=True)
    with output_lock(out):
        earlier, done, stale = _resume_from(out)
        pending = [(i, r) for i, r in todo if i not in done]
        progress(len(todo) - len(pending), len(todo))
        partial = out.parent / f".{out.name}.partial-{os.getpid()}"
        with create_new(partial) as f:
            kept = False  # the earlier records are all in the partial: replacing the output loses nothing
            new_tokens, t0, spec0 = 0, time.perf_counter(), _spec_counts(session)
            try:
                f.write(earlier)
                f.flush()
                kept = True
                for p in stale:
                    p.unlink(missing_ok=True)
                for start in range(0, len(pending), batch_size):
                    chunk = pending[start : start + batch_size]
                    text, n = _records(session, tok, chunk, max_new_tokens)
                    new_tokens += n
                    f.write(text.encode("utf-8"))
                    f.flush()
                    os.fsync(f.fileno())
                    progress(len(todo) - len(pending) + start + len(chunk), len(todo))
            finally:  # also when interrupted or failing: what was generated is kept (a torn line is dropped later)
                if kept:
                    f.flush()
                    os.replace(partial, out)
                else:
                    partial.unlink(missing_ok=True)
    seconds = time.perf_counter() - t0
    return {
        "prompts": len(todo),
        "generated": len(pending),
        "resumed_from": len(todo) - len(pending),
        "output": str(out),
        "new_tokens": new_tokens,  # up to each completion's end of sequence, as written
        "seconds": seconds,  # generating them (the load and the tokenizer excluded)
        "tokens_per_s": new_tokens / seconds if seconds > 0 else None,
        "speculation": _speculation(session, spec0),
    }


def _spec_counts(session) -> tuple[int, int, int] | None:
    """(rounds, drafted, accepted) so far of a session that speculates (the torch-compile target's with a draft);
    None for any other."""
    counts = getattr(session, "speculation_counts", None)
    return None if counts is None else counts()


def _speculation(session, before: tuple[int, int, int] | None) -> dict | None:
    """The speculative rounds of this file's generation and the share of the drafted tokens the model accepted."""
    now = _spec_counts(session)
    if now is None or before is None:
        return None
    rounds, drafted, accepted = (a - b for a, b in zip(now, before, strict=True))
    return {
        "rounds": rounds,
        "drafted": drafted,
        "accepted": accepted,
        "acceptance": accepted / drafted if drafted else None,
    }


def _records(session, tok, chunk: list[tuple], max_new_tokens: int) -> tuple[str, int]:
    """One batch's jsonl records, as one string (written whole or not at all), and the new tokens they hold."""
    ids = [tok(r["prompt"])["input_ids"] for _, r in chunk]
    budgets = [int(r.get("max_new_tokens", max_new_tokens)) for _, r in chunk]
    outs = _generate(session, ids, budgets)
    lines, n = [], 0
    for (i, r), toks in zip(chunk, outs, strict=True):
        toks = _until_eos(toks, tok.eos_token_id)
        n += len(toks)
        lines.append(
            json.dumps({"id": i, "prompt": r["prompt"], "completion": tok.decode(toks), "tokens": toks})
        )
    return "".join(line + "\n" for line in lines), n


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
