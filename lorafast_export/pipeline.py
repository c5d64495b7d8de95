"""The build pipeline: a flat list of named stages, a manifest, and an atomic output directory.

    load → merge → quantize → lower(target) → validate → manifest → publish (rename into place)

Everything is written into a hidden sibling `.<name>.partial-<pid>` and renamed to the requested path only when
complete, so an interrupted build never leaves a directory that looks finished.
"""

from __future__ import annotations

import errno
import logging
import os
import platform
import shutil
import signal
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from lorafast_export import __version__
from lorafast_export.adapters import Adapter, open_adapter
from lorafast_export.errors import InputError
from lorafast_export.manifest import read_manifest
from lorafast_export.manifest import write_manifest as write_manifest_file
from lorafast_export.outdir import publish, staged_output
from lorafast_export.recipe import Recipe, resolve_path
from lorafast_export.stagecache import StageCache, content_key
from lorafast_export.validate.gates import check_recipe_gates
from lorafast_export.weights import ModelDir, check_tokenizer, open_model, sha256_file

log = logging.getLogger(__name__)
VERSIONED = (
    "torch",
    "transformers",
    "peft",
    "safetensors",
    "onnxruntime",
    "onnxruntime-genai",
    "openvino",
    "openvino-genai",
    "nvidia-modelopt",
)


def library_versions() -> dict[str, str]:
    out = {"lorafast-export": __version__, "python": platform.python_version()}
    for name in VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


@dataclass
class BuildContext:
    recipe: Recipe
    out_dir: Path  # final location
    stage_dir: Path  # where we write until publish
    progress: Callable[[str, str], None] = lambda stage, msg: None
    base: ModelDir | None = None
    adapters: list[Adapter] = field(default_factory=list)
    merged_dir: Path | None = None  # config + tokenizer (+ weights when the merge was written)
    merged: ModelDir | None = None  # the merged model; its store may merge on read (merge.merged_view)
    quantized: object | None = None
    timings: dict[str, float] = field(default_factory=dict)
    input_hashes: list[dict] = field(default_factory=list)
    cache: object = None  # StageCache
    facts: dict[str, object] = field(default_factory=dict)
    report: dict | None = None

    @contextmanager
    def stage(self, name: str):
        self.progress(name, "start")
        t0 = time.perf_counter()
        yield
        self.timings[name] = round(time.perf_counter() - t0, 3)
        self.progress(name, "done")


# ---------------------------------------------------------------------------------------------- stages


def stage_load(ctx: BuildContext) -> None:
    from lorafast_export.targets.registry import require_available

    target = require_available(ctx.recipe.target.name)  # fail before any work if the runtime is missing
    r = ctx.recipe.inputs
    ctx.base = open_model(resolve_path(r.base), allow_pickle=r.allow_pickle)
    ctx.adapters = [
        open_adapter(f"{resolve_path(a.path)}:{a.weight}", r.allow_pickle, a.overrides()) for a in r.adapters
    ]
    _check_needs_tokenizer(ctx.recipe, ctx.base, target)
    ctx.input_hashes = input_hashes(ctx)


def _calibrated(method: str) -> bool:
    from lorafast_export.quant.methods import get_method

    return method != "none" and get_method(method).calibrated


def _check_needs_tokenizer(recipe: Recipe, base: ModelDir, target) -> None:
    uses = [
        *([f"the {target.name} artifact"] if getattr(target, "needs_tokenizer", False) else []),
        *(["validation"] if recipe.validate_.enabled else []),
        *([f"{recipe.quant.method} calibration"] if _calibrated(recipe.quant.method) else []),
    ]
    if uses:
        check_tokenizer(base, " and ".join(uses))


def stage_merge(ctx: BuildContext) -> None:
    """Unquantized builds lower from a merged checkpoint on disk (stage-cached). Quantized builds read the merged
    model through a view that merges each tensor as it is read: no second copy of the model is written."""
    from lorafast_export.merge import merge, merged_view, plan_merge

    if ctx.recipe.quant.method != "none":
        ctx.merged_dir = ctx.stage_dir / "work" / "merged-view"
        ctx.merged = merged_view(ctx.base, ctx.adapters, ctx.merged_dir, ctx.recipe.merge.dtype)
        plan, hit = ctx.merged.store.plan, False
    else:
        key = merge_key(ctx)
        with ctx.cache.entry("merged", key) as (path, hit):
            if hit:
                plan = plan_merge(ctx.base, ctx.adapters)
            else:
                plan = merge(
                    ctx.base,
                    ctx.adapters,
                    path,
                    dtype=ctx.recipe.merge.dtype,
                    on_group=lambda g: ctx.progress("merge", g),
                )
        ctx.merged_dir = ctx.cache.path("merged", key)
        ctx.merged = open_model(ctx.merged_dir)
    ctx.facts["merge"] = {
        "cached": hit,
        "written": ctx.recipe.quant.method == "none",
        "untied_embeddings": plan.untie,
        "notes": plan.notes,
        "adapters": [
            {"path": str(a.path), "type": a.kind, "weight": a.weight, "modules": len(a.modules)}
            for a in ctx.adapters
        ],
    }


def merge_key(ctx: BuildContext) -> str:
    return content_key(
        "merge",
        [i["sha256"] for i in ctx.input_hashes],
        ctx.recipe.inputs.model_dump(),
        ctx.recipe.merge.model_dump(),
        library_versions(),
    )


def stage_quantize(ctx: BuildContext) -> None:
    """The quantize walk spills each layer into the stage cache; a rerun with the same inputs reuses it."""
    if ctx.recipe.quant.method == "none":
        ctx.progress("quantize", "skipped (no quantization)")
        return
    from lorafast_export.model.quantized import load_quantized
    from lorafast_export.quant.calib import calibration_files
    from lorafast_export.quant.config import resolve_quant
    from lorafast_export.quant.walk import quantize_checkpoint, resolve_device
    from lorafast_export.targets.registry import get_target

    target = get_target(ctx.recipe.target.name)
    qc = resolve_quant(ctx.recipe.quant, getattr(target, "requires_symmetric", False))
    calib = [sha256_file(f) for f in calibration_files(qc.calib.files)] if qc.calibrated else []
    key = content_key(
        "quantize", merge_key(ctx), qc.source.model_dump(), calib, resolve_device(qc.device).type
    )
    with ctx.cache.entry("quantized", key) as (path, hit):
        if not hit:
            quantize_checkpoint(ctx.merged, qc, progress=lambda m: ctx.progress("quantize", m), out_dir=path)
    ctx.quantized = load_quantized(ctx.cache.path("quantized", key))
    ctx.facts["quant"] = {**qc.record(), "cached": hit}


def stage_lower(ctx: BuildContext) -> None:
    from lorafast_export.targets.registry import LowerInput, require_available

    target = require_available(ctx.recipe.target.name)
    inp = LowerInput(ctx.merged_dir, ctx.merged.config, ctx.recipe, ctx.quantized)
    ctx.facts["target"] = {"name": target.name, **(target.lower(inp, ctx.stage_dir / "model") or {})}


def stage_validate(ctx: BuildContext) -> None:
    if not ctx.recipe.validate_.enabled:
        ctx.progress("validate", "skipped (--no-validate)")
        return
    from lorafast_export.validate.run import validate_build

    ctx.report = validate_build(ctx)


STAGES: list[tuple[str, Callable[[BuildContext], None]]] = [
    ("load", stage_load),
    ("merge", stage_merge),
    ("quantize", stage_quantize),
    ("lower", stage_lower),
    ("validate", stage_validate),
]


# ---------------------------------------------------------------------------------------------- output


def input_hashes(ctx: BuildContext) -> list[dict]:
    files = [ctx.base.config_path, *ctx.base.store.files, *ctx.base.tokenizer_files]
    for a in ctx.adapters:
        files += [a.path / "adapter_config.json"] if a.path.is_dir() else []
        files += a.files
    return [{"path": str(f), "sha256": sha256_file(f), "bytes": f.stat().st_size} for f in files]


def write_manifest(ctx: BuildContext) -> dict:
    """manifest.json last: it lists (and hashes) every file the build wrote."""
    manifest = {
        "name": ctx.recipe.name,
        "inputs": ctx.input_hashes,
        "input_paths": recorded_input_paths(ctx.recipe, ctx.out_dir),
        "recipe": ctx.recipe.to_dict(),
        "versions": library_versions(),
        "timings_s": ctx.timings,
        "facts": ctx.facts,
        "metrics": (ctx.report or {}).get("summary"),
        "passed": None if ctx.report is None else ctx.report.get("passed"),
    }
    write_manifest_file(ctx.stage_dir, manifest)
    return manifest


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
    from lorafast_export.targets.registry import require_available

    man = read_manifest(artifact, old_ok=True)
    try:
        name = man["recipe"]["target"]["name"]
    except (KeyError, TypeError):
        raise InputError(f"{artifact / 'manifest.json'}: damaged manifest (no recipe.target.name).") from None
    return require_available(name)


def _with_fault_injection(progress: Callable[[str, str], None]) -> Callable[[str, str], None]:
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


def run_build(recipe: Recipe, progress: Callable[[str, str], None] | None = None) -> BuildContext:
    check_recipe_gates(recipe)
    out = recipe.output.path
    with staged_output(out, recipe.output.force) as stage_dir:
        ctx = BuildContext(recipe, out, stage_dir, _with_fault_injection(progress or (lambda s, m: None)))
        ctx.cache = StageCache(recipe.output.cache, stage_dir / "work")
        try:
            for name, fn in STAGES:
                with ctx.stage(name):
                    fn(ctx)
            shutil.rmtree(stage_dir / "work", ignore_errors=True)
            ctx.progress("manifest", "start")
            write_manifest(ctx)
            ctx.progress("publish", "start")
            publish(stage_dir, out)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise InputError(
                    f"{e.filename or out}: no space left on device while building; nothing was "
                    "published. Free some space or choose another --out / LORAFAST_CACHE."
                ) from None
            raise
    return ctx
