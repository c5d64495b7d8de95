"""Validation orchestration: reference + candidates → streamed metrics → report files + gates.

Every stage the build produced is a candidate, compared with the reference (the unmerged PEFT model) and with
the stage before it, block by block: logits never exist for more than one block at a time.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from pathlib import Path

import torch

from lorafast_export.adapters import Adapter
from lorafast_export.errors import InputError
from lorafast_export.validate.candidates import (
    Candidate,
    decoder_candidate,
    merged_fp32_candidate,
    session_candidate,
)
from lorafast_export.validate.data import EvalSet, load_eval_sets, load_prompts
from lorafast_export.validate.gates import check_recipe_gates
from lorafast_export.validate.reference import Reference, ReferenceCache
from lorafast_export.weights import ModelDir, sha256_file

log = logging.getLogger(__name__)


@dataclasses.dataclass
class ValidationInputs:
    base: ModelDir
    adapters: list[Adapter]
    recipe: object  # Recipe
    candidates: list[Candidate]
    artifact_name: str
    target: str
    quant: str
    layer_errors: list[dict] | None = None


def _tokenizer(base: ModelDir):
    import transformers

    if not base.tokenizer_files:
        raise InputError(f"{base.path}: no tokenizer files; validation needs the base model's tokenizer.")
    return transformers.AutoTokenizer.from_pretrained(base.path)


def _input_digests(base: ModelDir, adapters: list[Adapter]) -> list[str]:
    files = [base.config_path, *base.store.files]
    for a in adapters:
        files += a.files + ([a.path / "adapter_config.json"] if a.path.is_dir() else [])
    return [f"{a.weight}" for a in adapters] + [sha256_file(f) for f in files]


def _reference_blocks(ref_fn, cache: ReferenceCache, kind: str, es: EvalSet) -> list[torch.Tensor]:
    """Reference logits for every block of an eval set, from the cache or computed (then cached)."""
    cached = cache.load(kind, es.digest())
    if cached is not None and len(cached) == len(es.blocks):
        return cached
    blocks = [ref_fn(b[None])[0, :-1] for b in es.blocks]
    cache.save(kind, es.digest(), blocks)
    return blocks


def _compare(es: EvalSet, ref_blocks, base_blocks, candidates: list[Candidate]):
    from lorafast_export.validate.metrics import MetricAccumulator, PerplexityAccumulator

    vs_ref = {c.name: MetricAccumulator() for c in candidates}
    vs_prev = {c.name: MetricAccumulator() for c in candidates[1:]}
    ppl_ref, ppl_base = PerplexityAccumulator(), PerplexityAccumulator()
    for block, ref, base in zip(es.blocks, ref_blocks, base_blocks, strict=True):
        labels, positions = block[1:], torch.arange(len(block) - 1)
        ppl_ref.update(ref, labels)
        ppl_base.update(base, labels)
        prev = None
        for c in candidates:
            logits = c.logits(block[None])[0, :-1]
            vs_ref[c.name].update(ref, logits, labels, positions)
            if prev is not None:
                vs_prev[c.name].update(prev, logits, labels, positions)
            prev = logits
    return vs_ref, vs_prev, ppl_ref.ppl, ppl_base.ppl


def run_validation(v: ValidationInputs, out_dir: Path, progress=lambda m: None):
    """Compute every stage's metrics and write report.json/.md/.html (+ junit) into out_dir."""
    from lorafast_export.report.schema import (
        ArtifactInfo,
        EvalSetInfo,
        LayerError,
        build_report,
        stage_result,
    )
    from lorafast_export.validate.gates import DEFAULT_GATES
    from lorafast_export.validate.metrics import greedy_agreement

    opts = v.recipe.validate_
    tok = _tokenizer(v.base)
    specs = [(e.name, Path(e.path)) for e in opts.eval]
    eval_sets = load_eval_sets(tok, specs, opts.block_size, opts.max_tokens)
    prompts = load_prompts(tok, Path(opts.prompts) if opts.prompts else None)
    progress("reference")
    device = (
        "cuda" if opts.device == "cuda" or (opts.device == "auto" and torch.cuda.is_available()) else "cpu"
    )
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[opts.dtype]
    if dtype != torch.float32 and device == "cpu":
        raise InputError(
            "validate.dtype: a half-precision reference needs a GPU (validate.device cuda); use float32."
        )
    reference = Reference(v.base, v.adapters, device, dtype)
    cache = ReferenceCache(
        _input_digests(v.base, v.adapters), {"block": opts.block_size, "dtype": opts.dtype}
    )
    infos, stages = [], []
    for es in eval_sets:
        progress(f"eval set {es.name}")
        ref_blocks = _reference_blocks(reference.logits, cache, "ref", es)
        base_blocks = _reference_blocks(reference.base_logits, cache, "base", es)
        vs_ref, vs_prev, ppl_ref, ppl_base = _compare(es, ref_blocks, base_blocks, v.candidates)
        infos.append(
            EvalSetInfo(
                name=es.name, tokens=es.tokens, sequences=len(es.blocks), ppl_ref=ppl_ref, ppl_base=ppl_base
            )
        )
        greedy = _greedy(reference, v.candidates, prompts, opts.max_new_tokens, progress)
        prev_name = None
        for c in v.candidates:
            stages.append(
                stage_result(
                    c.name,
                    es.name,
                    vs_ref[c.name].result(),
                    vs_prev[c.name].result() if c.name in vs_prev else None,
                    prev_name,
                    greedy_agreement(greedy["reference"], greedy[c.name]),
                )
            )
            prev_name = c.name
    layer_errors = [LayerError(**e) for e in v.layer_errors] if v.layer_errors else None
    note = next((c.note for c in v.candidates if c.name == "artifact" and c.note), None)
    report = build_report(
        ArtifactInfo(name=v.artifact_name, target=v.target, quant=v.quant, runtime_note=note),
        infos,
        stages,
        opts.gates if opts.gates is not None else DEFAULT_GATES,
        layer_errors,
        final_stage="artifact" if any(c.name == "artifact" for c in v.candidates) else None,
    )
    write_reports(report, out_dir, opts.junit)
    return report


_GREEDY_CACHE: dict[tuple, list[list[int]]] = {}


def _greedy(reference: Reference, candidates, prompts, n: int, progress) -> dict[str, list[list[int]]]:
    progress("greedy generation")
    key = (id(reference), n, tuple(map(tuple, prompts)))
    if key not in _GREEDY_CACHE:
        _GREEDY_CACHE[key] = [reference.generate(p, n) for p in prompts]
    out = {"reference": _GREEDY_CACHE[key]}
    for c in candidates:
        out[c.name] = [c.generate(p, n) for p in prompts]
    return out


REPORT_FILES = ("report.json", "report.md", "report.html")


def write_reports(report, out_dir: Path, junit: str | None = None) -> None:
    """report.json/.md/.html and the JUnit file (a path relative to out_dir), all inside out_dir, never through
    a link (out_dir may be a downloaded artifact being re-validated)."""
    from lorafast_export.report.files import write_inside
    from lorafast_export.report.github import append_step_summary
    from lorafast_export.report.html import render_html
    from lorafast_export.report.json_report import to_json
    from lorafast_export.report.junit import render_junit
    from lorafast_export.report.markdown import render_markdown

    files = {  # REPORT_FILES
        "report.json": to_json(report),
        "report.md": render_markdown(report),
        "report.html": render_html(report),
    }
    write_inside(out_dir, files | ({junit: render_junit(report)} if junit is not None else {}))
    append_step_summary(report)


# ---------------------------------------------------------------------------------------------- build stage


def build_candidates(ctx) -> list[Candidate]:
    """merged-fp32 → merged-<dtype> (if the checkpoint is not fp32) → quantized (if any) → artifact."""
    from lorafast_export.merge import plan_merge
    from lorafast_export.model.decoder import load_decoder
    from lorafast_export.targets.registry import get_target

    plan = plan_merge(ctx.base, ctx.adapters)
    cands = [merged_fp32_candidate(plan)]
    merged = ctx.merged
    dtypes = {merged.store.get(k).dtype for k in merged.store.keys()[:8]}
    if dtypes != {torch.float32}:
        name = "merged-" + {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(next(iter(dtypes)), "weights")
        cands.append(decoder_candidate(name, load_decoder(merged, torch.float32)))
    if ctx.quantized is not None:
        from lorafast_export.model.quantized import fake_quant_decoder

        cands.append(decoder_candidate("quantized", fake_quant_decoder(ctx.quantized)))
    target = get_target(ctx.recipe.target.name)
    cands.append(session_candidate("artifact", target.load(ctx.stage_dir / "model")))
    # Informational: the runtime at its own default precision (e.g. OpenVINO's bf16 + u8 KV cache on CPUs that
    # have bf16), so users see what the default costs. Gates apply to "artifact", not to this stage.
    if "precision" in inspect.signature(target.load).parameters:
        cands.append(
            session_candidate(
                "artifact-runtime-default", target.load(ctx.stage_dir / "model", precision="default")
            )
        )
    return cands


def layer_weight_errors(ctx) -> list[dict] | None:
    if ctx.quantized is None:
        return None
    import re

    from lorafast_export.qform import dequantize

    merged = ctx.merged
    out = []
    for name, qt in ctx.quantized.q.items():
        w = merged.store.get(name + ".weight").float()
        if qt.input_scale is not None:  # folded AWQ/SmoothQuant scale: compare in the original basis
            w = w * qt.input_scale.float()[None, :]
        err = float((dequantize(qt) - w).norm() / w.norm().clamp_min(1e-12))
        m = re.search(r"layers\.(\d+)\.", name)
        out.append({"module": name, "layer": int(m.group(1)) if m else None, "rel_error": err})
    return out


def quant_label(recipe) -> str:
    if recipe.quant.method == "none":
        return "none"
    r = recipe.quant.resolved()
    g = "pc" if r["group_size"] == -1 else f"g{r['group_size']}"
    return f"{r['method']}-w{r['bits']}-{g}"


def validate_build(ctx) -> dict:
    """The build's validate stage: writes reports into the staging directory; returns a summary."""
    from lorafast_export.report.markdown import render_markdown

    v = ValidationInputs(
        ctx.base,
        ctx.adapters,
        ctx.recipe,
        build_candidates(ctx),
        ctx.recipe.name,
        ctx.recipe.target.name,
        quant_label(ctx.recipe),
        layer_weight_errors(ctx),
    )
    report = run_validation(v, ctx.stage_dir, lambda m: ctx.progress("validate", m))
    return summarize(report) | {"markdown_table": render_markdown(report)}


def validate_artifact(artifact: Path, overrides: dict, progress=lambda m: None):
    """Re-validate an existing artifact against its inputs (from its manifest); reports go into the artifact."""
    from lorafast_export.adapters import open_adapter
    from lorafast_export.manifest import locate_inputs, read_manifest, record_files
    from lorafast_export.merge import plan_merge
    from lorafast_export.recipe import Recipe, resolve_path
    from lorafast_export.targets.registry import require_available
    from lorafast_export.weights import open_model

    man_path = artifact / "manifest.json"
    man = read_manifest(artifact, old_ok=True)
    data = man.get("recipe")
    if isinstance(data, dict) and isinstance(data.get("validate"), dict):
        data["validate"].pop(
            "junit", None
        )  # where this run writes JUnit is --junit's choice, not the build's
    if not isinstance(data, dict):
        raise InputError(f"{man_path}: damaged manifest (no recipe); rebuild the artifact.")
    recipe = Recipe.from_dict(locate_inputs(data, man, artifact), str(man_path))
    recipe = recipe.with_overrides(overrides) if overrides else recipe
    check_recipe_gates(recipe, revalidate=True)
    base = open_model(resolve_path(recipe.inputs.base), recipe.inputs.allow_pickle)
    adapters = [
        open_adapter(f"{resolve_path(a.path)}:{a.weight}", recipe.inputs.allow_pickle, a.overrides())
        for a in recipe.inputs.adapters
    ]
    session = require_available(recipe.target.name).load(artifact / "model")
    cands = [merged_fp32_candidate(plan_merge(base, adapters)), session_candidate("artifact", session)]
    v = ValidationInputs(base, adapters, recipe, cands, recipe.name, recipe.target.name, quant_label(recipe))
    report = run_validation(v, artifact, progress)
    # the reports were rewritten: their new hashes go into the manifest, so the artifact still verifies
    record_files(artifact, [*REPORT_FILES, *([recipe.validate_.junit] if recipe.validate_.junit else [])])
    return report


def summarize(report) -> dict:
    final = [s for s in report.stages if s.name == report.stages[-1].name]
    return {
        "passed": report.passed,
        "summary": {
            s.eval_set: {
                "kl_mean": s.kl_mean,
                "top1": s.top1,
                "ppl_ratio": s.ppl_ratio,
                "greedy_match": s.greedy_match,
            }
            for s in final
        },
        "gates": [{"expr": g.expr, "value": g.value, "passed": g.passed} for g in report.gates],
    }
