"""The build: typed stages that pass values, a manifest, and an atomic output directory.

    loaded = load_stage(recipe.inputs, tokenizer_for)         # base + adapters opened, inputs hashed
    merged = merge_stage(loaded, recipe.merge, cache, ...)    # exact merge (on disk, or merge-on-read view)
    quantized = quantize_stage(merged, recipe.quant, ...)     # None for quant.method none
    lowered = lower_stage(merged, quantized, recipe, ...)     # the target writes model/
    report = validate_stage(recipe, loaded, merged, ...)      # None with validation off
    write_build_manifest(...); publish(...)

`run_build` below is exactly that sequence. Everything is written into a hidden sibling `.<name>.partial-<pid>`
and renamed to the requested path only when complete (outdir.py), so an interrupted build never leaves a
directory that looks finished. The `merge` command runs load_stage + write_merged + the same manifest + publish.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorafast_export.adapters import Adapter, open_adapter
from lorafast_export.errors import InputError
from lorafast_export.manifest import library_versions, read_manifest, recorded_target, write_manifest
from lorafast_export.outdir import publish, staged_output
from lorafast_export.paths import resolve_path
from lorafast_export.recipe import Inputs, MergeOptions, QuantOptions, Recipe
from lorafast_export.specs import target_spec
from lorafast_export.stagecache import StageCache, content_key
from lorafast_export.validate.gates import check_recipe_gates
from lorafast_export.weights import ModelDir, check_tokenizer, open_model, sha256_file

Progress = Callable[[str, str], None]  # (stage, message)


@dataclass(frozen=True)
class Loaded:
    """The build's inputs, opened (weights are read lazily, tensor by tensor) and hashed."""

    options: Inputs
    base: ModelDir
    adapters: list[Adapter]
    hashes: list[dict]  # {"path", "sha256", "bytes"} of every input file, for the manifest and cache keys


@dataclass(frozen=True)
class Merged:
    """The merged model. `dir` holds config + tokenizer (+ the weights when the merge was written); `model`'s
    store may merge each tensor as it is read (merge.merged_view, for quantized builds)."""

    dir: Path
    model: ModelDir
    key: str  # content key of the merge: the quantize stage's cache key builds on it
    facts: dict


@dataclass(frozen=True)
class Quantized:
    model: Any  # model.quantized.QuantizedModel: codes + scales, read lazily from the stage cache
    config: Any  # quant.config.QuantConfig
    facts: dict


@dataclass(frozen=True)
class Built:
    """What run_build returns: where the artifact is, how long each stage took, what it recorded."""

    out_dir: Path
    timings: dict[str, float]
    facts: dict[str, Any]
    report: dict | None  # validation summary (passed, summary, gates, markdown_table); None if not validated


class Timer:
    """Times stages and reports their start and end to `progress`."""

    def __init__(self, progress: Progress):
        self.progress = progress
        self.timings: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        self.progress(name, "start")
        t0 = time.perf_counter()
        yield
        self.timings[name] = round(time.perf_counter() - t0, 3)
        self.progress(name, "done")


# ---------------------------------------------------------------------------------------------- stages


def load_stage(inputs: Inputs, tokenizer_for: str = "") -> Loaded:
    """Open the base and the adapters; tokenizer_for (e.g. "validation"): who needs the base's tokenizer, so a
    broken one fails here, before any work."""
    base = open_model(resolve_path(inputs.base), allow_pickle=inputs.allow_pickle)
    adapters = [
        open_adapter(f"{resolve_path(a.path)}:{a.weight}", inputs.allow_pickle, a.overrides())
        for a in inputs.adapters
    ]
    if tokenizer_for:
        check_tokenizer(base, tokenizer_for)
    return Loaded(inputs, base, adapters, input_hashes(base, adapters))


def tokenizer_users(recipe: Recipe, target) -> str:
    """Who in this build reads the base's tokenizer ("" if nobody)."""
    from lorafast_export.quant.methods import get_method

    calibrated = recipe.quant.method != "none" and get_method(recipe.quant.method).calibrated
    uses = [
        *([f"the {target.name} artifact"] if target_spec(target.name).needs_tokenizer else []),
        *(["validation"] if recipe.validate_.enabled else []),
        *([f"{recipe.quant.method} calibration"] if calibrated else []),
    ]
    return " and ".join(uses)


def merge_key(loaded: Loaded, options: MergeOptions) -> str:
    return content_key(
        "merge",
        [i["sha256"] for i in loaded.hashes],
        loaded.options.model_dump(),
        options.model_dump(),
        library_versions(),
    )


def write_merged(loaded: Loaded, options: MergeOptions, out: Path, progress: Progress):
    """The merged checkpoint written into out (config, shards, tokenizer); returns the merge plan."""
    from lorafast_export.merge import merge

    return merge(
        loaded.base, loaded.adapters, out, dtype=options.dtype, on_group=lambda g: progress("merge", g)
    )


def merge_stage(
    loaded: Loaded, options: MergeOptions, cache: StageCache, *, lazy: bool, progress: Progress
) -> Merged:
    """lazy (quantized builds): a view that merges each tensor as it is read, so no second copy of the model is
    written. Otherwise (unquantized builds lower from a checkpoint on disk) the merge is written, stage-cached."""
    from lorafast_export.merge import merged_view, plan_merge

    key = merge_key(loaded, options)
    if lazy:
        path = cache.scratch / "merged-view"
        model = merged_view(loaded.base, loaded.adapters, path, options.dtype)
        plan, hit = model.store.plan, False
    else:
        with cache.entry("merged", key) as (entry, hit):
            plan = (
                plan_merge(loaded.base, loaded.adapters)
                if hit
                else write_merged(loaded, options, entry, progress)
            )
        path = cache.path("merged", key)
        model = open_model(path)
    facts = {
        "cached": hit,
        "written": not lazy,
        "untied_embeddings": plan.untie,
        "notes": plan.notes,
        "adapters": [
            {"path": str(a.path), "type": a.kind, "weight": a.weight, "modules": len(a.modules)}
            for a in loaded.adapters
        ],
    }
    return Merged(path, model, key, facts)


def quantize_stage(
    merged: Merged, options: QuantOptions, target, cache: StageCache, progress: Progress
) -> Quantized | None:
    """The quantize walk spills each layer into the stage cache; a rerun with the same inputs reuses it."""
    if options.method == "none":
        progress("quantize", "skipped (no quantization)")
        return None
    from lorafast_export.model.quantized import load_quantized
    from lorafast_export.quant.calib import calibration_files
    from lorafast_export.quant.config import resolve_quant
    from lorafast_export.quant.walk import quantize_checkpoint, resolve_device

    qc = resolve_quant(options, target_spec(target.name).requires_symmetric)
    calib = [sha256_file(f) for f in calibration_files(qc.calib.files)] if qc.calibrated else []
    key = content_key(  # the resolved settings too: a changed default is a new entry
        "quantize", merged.key, qc.source.model_dump(), qc.record(), calib, resolve_device(qc.device).type
    )
    with cache.entry("quantized", key) as (path, hit):
        if not hit:
            quantize_checkpoint(merged.model, qc, progress=lambda m: progress("quantize", m), out_dir=path)
    return Quantized(load_quantized(cache.path("quantized", key)), qc, {**qc.record(), "cached": hit})


def lower_stage(merged: Merged, quantized: Quantized | None, recipe: Recipe, target, out: Path) -> dict:
    """The target writes the artifact's model/ directory; returns its facts for the manifest."""
    from lorafast_export.targets.registry import LowerInput

    inp = LowerInput(merged.dir, merged.model.config, recipe, None if quantized is None else quantized.model)
    return {"name": target.name, **(target.lower(inp, out) or {})}


def validate_stage(
    recipe: Recipe,
    loaded: Loaded,
    merged: Merged,
    quantized: Quantized | None,
    artifact_dir: Path,
    progress: Progress,
) -> dict | None:
    """Every stage's output against the unmerged reference (validate/run.py); reports go into artifact_dir."""
    if not recipe.validate_.enabled:
        progress("validate", "skipped (--no-validate)")
        return None
    from lorafast_export.validate.run import validate_build

    return validate_build(
        recipe,
        loaded.base,
        loaded.adapters,
        merged.model,
        None if quantized is None else quantized.model,
        artifact_dir,
        lambda m: progress("validate", m),
    )


def run_build(recipe: Recipe, progress: Progress | None = None) -> Built:
    check_recipe_gates(recipe)
    out = recipe.output.path
    progress = _with_fault_injection(progress or (lambda s, m: None))
    stage = Timer(progress)
    with staged_output(out, recipe.output.force) as stage_dir:
        cache = StageCache(recipe.output.cache, stage_dir / "work")
        try:
            with stage("load"):
                target = _target(recipe.target.name)  # fail before any work if the runtime is missing
                loaded = load_stage(recipe.inputs, tokenizer_users(recipe, target))
            with stage("merge"):
                lazy = recipe.quant.method != "none"
                merged = merge_stage(loaded, recipe.merge, cache, lazy=lazy, progress=progress)
            with stage("quantize"):
                quantized = quantize_stage(merged, recipe.quant, target, cache, progress)
            with stage("lower"):
                lowered = lower_stage(merged, quantized, recipe, target, stage_dir / "model")
            with stage("validate"):
                report = validate_stage(recipe, loaded, merged, quantized, stage_dir, progress)
            shutil.rmtree(stage_dir / "work", ignore_errors=True)
            facts = {"merge": merged.facts, **({"quant": quantized.facts} if quantized else {})}
            facts["target"] = lowered
            progress("manifest", "start")
            write_build_manifest(stage_dir, recipe, loaded, stage.timings, facts, report)
            progress("publish", "start")
            publish(stage_dir, out)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise InputError(
                    f"{e.filename or out}: no space left on device while building; nothing was "
                    "published. Free some space or choose another --out / LORAFAST_CACHE."
                ) from None
            raise
    return Built(out, stage.timings, facts, report)


def merge_only(recipe: Recipe, progress: Progress) -> dict:
    """The `merge` command: the build's load stage and merge writer, with the build's manifest (the merged
    checkpoint is an artifact too: verifiable, replaceable with --force), published like a build."""
    out = recipe.output.path
    stage = Timer(progress)
    with staged_output(out, recipe.output.force) as stage_dir:
        with stage("load"):
            loaded = load_stage(recipe.inputs)
        with stage("merge"):
            plan = write_merged(loaded, recipe.merge, stage_dir, progress)
        write_build_manifest(stage_dir, recipe, loaded, stage.timings, {}, None)
        publish(stage_dir, out)
    return {
        "out": str(out),
        "adapters": [str(a.path) for a in loaded.adapters],
        "untied_embeddings": plan.untie,
        "notes": plan.notes,
        "timings_s": stage.timings,
    }


def _target(name: str):
    from lorafast_export.targets.registry import require_available

    return require_available(name)


# ---------------------------------------------------------------------------------------------- output


def input_hashes(base: ModelDir, adapters: list[Adapter]) -> list[dict]:
    files = [base.config_path, *base.store.files, *base.tokenizer_files]
    for a in adapters:
        files += [a.path / "adapter_config.json"] if a.path.is_dir() else []
        files += a.files
    return [{"path": str(f), "sha256": sha256_file(f), "bytes": f.stat().st_size} for f in files]


def write_build_manifest(
    stage_dir: Path, recipe: Recipe, loaded: Loaded, timings: dict, facts: dict, report: dict | None
) -> None:
    """manifest.json last: it lists (and hashes) every file the build wrote."""
    manifest = {
        "name": recipe.name,
        "inputs": loaded.hashes,
        "input_paths": recorded_input_paths(recipe, recipe.output.path),
        "recipe": recipe.to_dict(),
        "versions": library_versions(),
        "timings_s": timings,
        "facts": facts,
        "metrics": (report or {}).get("summary"),
        "passed": None if report is None else report.get("passed"),
    }
    write_manifest(stage_dir, manifest)


def recorded_input_paths(recipe: Recipe, out: Path) -> dict[str, dict[str, str]]:
    """Each input path of the recipe as an absolute path and relative to the artifact (where the manifest
    lies), so `validate --artifact` finds the inputs from any working directory, and after a move of both."""
    out = out.expanduser().absolute()
    return {
        field: {"absolute": str(p), "relative": os.path.relpath(p, out)}
        for field, written in recipe.read_paths()
        if not written.startswith("demo:")
        for p in [resolve_path(written).absolute()]
    }


def artifact_target(artifact: Path):
    """The target an artifact was built for (from its manifest), ready to load sessions."""
    return _target(recorded_target(read_manifest(artifact, old_ok=True), artifact))


def _with_fault_injection(progress: Progress) -> Progress:
    """LORAFAST_FAULT_KILL_AT=N: SIGKILL this process at the N-th progress event (interruption tests)."""
    at = int(os.environ.get("LORAFAST_FAULT_KILL_AT", "0") or 0)
    if not at:
        return progress
    seen = [0]

    def wrapped(stage: str, msg: str) -> None:
        seen[0] += 1
        if seen[0] == at:
            os.kill(os.getpid(), signal.SIGKILL)
        progress(stage, msg)

    return wrapped
