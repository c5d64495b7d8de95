"""Library entry points for the CLI's run, bench and generate subcommands on torch-compile artifacts."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from lorafast_export.errors import InputError
from lorafast_export.runtime.artifact import META_FILE
from lorafast_export.runtime.bench import bench_runtime
from lorafast_export.runtime.loader import Runtime, open_runtime


def model_dir_of(artifact_dir: str | Path) -> Path:
    """Accept the artifact root (out/<name>) or its model/ directory."""
    d = Path(artifact_dir)
    for cand in (d / "model", d):
        if (cand / META_FILE).exists():
            return cand
    raise InputError(
        f"{d}: not a torch-compile artifact (no model/{META_FILE}); build one with "
        "`lorafast-export build --target torch-compile`."
    )


def load(
    artifact_dir: str | Path, device: str = "cpu", draft: str | Path | None = None, **overrides: Any
) -> Runtime:
    """draft: another torch-compile artifact of the same vocabulary (e.g. the int4 build of the same
    fine-tune) that drafts tokens for speculative greedy decoding."""
    draft_dir = None if draft is None else model_dir_of(draft)
    return open_runtime(model_dir_of(artifact_dir), device, draft_dir=draft_dir, **overrides)


def run_prompt(
    artifact_dir: str | Path,
    prompt_ids: list[int],
    max_new_tokens: int,
    device: str = "cpu",
    draft: str | Path | None = None,
    **overrides: Any,
) -> list[int]:
    """Greedy new tokens for one prompt (speculative with a draft artifact: the same tokens). One row: the runtime
    is loaded with max_batch 1 unless overrides set it, so its warm-up compiles and captures batch 1's shapes only
    (the artifact's default buckets 1-32 made an 8B `run --speculative int4` spend minutes at load); a batch-1 step
    is the same step at any max_batch."""
    overrides.setdefault("max_batch", 1)
    rt = load(artifact_dir, device, draft, **overrides)
    return rt.generate_batch([list(prompt_ids)], max_new_tokens)[0]


def bench(
    artifact_dir: str | Path,
    batch_sizes: list[int],
    prompt_len: int,
    new_tokens: int,
    device: str = "cpu",
    draft: str | Path | None = None,
    baseline: bool = True,
    **overrides: Any,
) -> dict:
    """Prefill/decode tokens/s, TTFT and peak memory per batch size (see runtime.bench), JSON-able. With a draft
    artifact also the speculative acceptance rate, and (baseline) the same benchmark of the artifact loaded
    without the draft, measured first and released before the draft's runtime loads (so they never share the
    device's memory): `plain` holds its rows, and each row its `decode_speedup`, decode tokens/s with the draft over
    those without (the runtime options the same, but for the draft's own)."""
    plain = None
    if draft is not None and baseline:
        alone = {k: v for k, v in overrides.items() if k != "draft_int4"}
        plain = _bench_loaded(artifact_dir, batch_sizes, prompt_len, new_tokens, device, None, alone)
    run = _bench_loaded(artifact_dir, batch_sizes, prompt_len, new_tokens, device, draft, overrides)
    res = {"artifact": str(artifact_dir), **run}
    if draft is not None:
        res["draft"] = str(draft) + (" (its linears int4 at load)" if overrides.get("draft_int4") else "")
    if plain is not None:
        res["plain"] = plain["results"]
        for row, alone in zip(res["results"], plain["results"], strict=True):
            spec, base = row["decode_tokens_per_s"], alone["decode_tokens_per_s"]
            row["decode_speedup"] = spec / base if spec and base else None
    return res


def _bench_loaded(artifact_dir, batch_sizes, prompt_len, new_tokens, device, draft, overrides) -> dict:
    """bench_runtime on the artifact loaded (with the draft, if any), its runtime released on return."""
    import gc

    import torch

    rt = load(artifact_dir, device, draft, **overrides)
    if max(batch_sizes) > rt.options.max_batch:
        # loaded again for the larger batch, the first one released first
        rt = None
        gc.collect()
        rt = load(artifact_dir, device, draft, **{**overrides, "max_batch": max(batch_sizes)})
    try:
        return bench_runtime(rt, batch_sizes, prompt_len, new_tokens)
    finally:
        del rt
        gc.collect()
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()


def generate_stream(
    rt: Runtime, prompts: Iterable[tuple[Any, list[int]]], max_new_tokens: int, **sampling: Any
) -> Iterator[tuple[Any, list[int]]]:
    """Stream (key, prompt ids) through continuous batching, yielding (key, new tokens) as each finishes
    (completion order). Keeps the queue about two batches deep, so a huge prompt file never sits in memory."""
    eng, it, keys = rt.engine, iter(prompts), {}
    exhausted = False
    while True:
        while not exhausted and len(eng.waiting) < 2 * eng.max_batch:
            try:
                key, ids = next(it)
            except StopIteration:
                exhausted = True
                break
            keys[eng.add(list(ids), max_new_tokens, **sampling).id] = key
        if not eng.has_work:
            return
        for r in eng.step():
            yield keys.pop(r.id), r.output
