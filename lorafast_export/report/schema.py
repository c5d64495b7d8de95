"""report.json: the validated, versioned structure every report writer renders.

Non-finite floats are written as the JSON strings "NaN" / "Infinity" (a broken candidate can produce
them and they must survive a round trip as failures); `null` means "not computed / undefined".
Stages are listed in pipeline order, each once per eval set; the last stage is the final artifact.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from lorafast_export.errors import InputError
from lorafast_export.validate.gates import DEFAULT_GATES, Gate, GateResult, all_passed, evaluate_gates
from lorafast_export.validate.metrics import COMPARISON_METRICS, GREEDY_METRICS, adapter_gain_retained

SCHEMA_ID = "lorafast-export/report/v1"
# The usual pipeline order (a run may have fewer or other stage names; the report keeps the run's order).
STAGE_NAMES: tuple[str, ...] = ("merged-fp32", "merged-fp16", "quantized", "artifact")

Metric = float | None


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="strings", populate_by_name=True)


class ArtifactInfo(_Model):
    name: str
    target: str  # e.g. "torch_compile", "onnxruntime"
    quant: str  # e.g. "gptq-w4-g128", "none"
    # set when the artifact stage was not run by the target's own runtime (e.g. our reader of a quantized
    # checkpoint, or of a TensorRT-LLM bundle): what ran instead, shown next to the verdict
    runtime_note: str | None = None
    # set when part of validation was skipped (e.g. the greedy check on a CPU that cannot hold the model)
    validation_note: str | None = None


class EvalSetInfo(_Model):
    name: str
    tokens: int
    sequences: int | None = None
    ppl_ref: Metric = None  # the unmerged FP reference (what the user trained)
    ppl_base: Metric = None  # the bare base model, no adapter; enables adapter_gain_retained


class PositionBucket(_Model):
    start: int
    end: int  # inclusive
    kl_mean: Metric
    tokens: int


class KLHistogram(_Model):
    edges: list[float]  # len(counts) + 1 log-spaced edges, in nats
    counts: list[int]
    underflow: int  # KL below edges[0], exact zeros included
    overflow: int  # KL at or above edges[-1], inf included


class KLStats(_Model):
    """A stage compared with another: per-token KL(other ‖ stage) and the same-top-1 rate (COMPARISON_METRICS)."""

    kl_mean: Metric
    kl_sem: Metric
    kl_median: Metric
    kl_p90: Metric
    kl_p99: Metric
    kl_max: Metric
    top1: Metric


class _Against(_Model):
    against: str


class _StageKey(_Model):
    name: str
    eval_set: str
    tokens: int


# KLStats is listed first so that its fields come after the key fields (pydantic orders fields from the last
# base to the class itself), keeping report.json's key order: name, eval_set, tokens, kl_mean, ...


class Comparison(KLStats, _Against):
    """Distribution metrics of a stage against the stage before it (attribution of the error)."""


class StageResult(KLStats, _StageKey):
    ppl: Metric
    ppl_ratio: Metric
    dp_mean: Metric
    dp_p1: Metric
    dp_p99: Metric
    dp_rms: Metric
    greedy_match: Metric = None
    first_divergence_mean: Metric = None
    vs_previous: Comparison | None = None
    kl_by_position: list[PositionBucket] = Field(default_factory=list)
    kl_hist: KLHistogram | None = None


class LayerError(_Model):
    module: str  # e.g. "model.layers.3.mlp.down_proj"
    layer: int | None = None
    rel_error: float  # ||W_q - W||_F / ||W||_F


class Report(_Model):
    schema_: Literal["lorafast-export/report/v1"] = Field(SCHEMA_ID, alias="schema")
    artifact: ArtifactInfo
    eval_sets: list[EvalSetInfo]
    stages: list[StageResult]
    # stage -> eval set -> (ppl_base - ppl) / (ppl_base - ppl_ref); None where undefined
    adapter_gain_retained: dict[str, dict[str, Metric]] = Field(default_factory=dict)
    layer_weight_error: list[LayerError] | None = None
    gates: list[GateResult] = Field(default_factory=list)
    passed: bool


# ----------------------------------------------------------------------------- building


def stage_result(
    name: str,
    eval_set: str,
    metrics: Mapping[str, Any],
    vs_previous: Mapping[str, Any] | None = None,
    previous: str | None = None,
    greedy: Mapping[str, Any] | None = None,
) -> StageResult:
    """One stage on one eval set from MetricAccumulator.result() (vs reference, and vs the previous stage's
    logits) and greedy_agreement(); unknown keys of those dicts are ignored."""
    fields = {
        k: metrics[k] for k in StageResult.model_fields if k in metrics and k not in ("name", "eval_set")
    }
    if vs_previous is not None:
        if previous is None:
            raise InputError(
                f"stage {name!r}: vs_previous metrics need the name of the previous stage ('previous')"
            )
        fields["vs_previous"] = Comparison(
            against=previous, **{k: vs_previous[k] for k in COMPARISON_METRICS}
        )
    for key in GREEDY_METRICS if greedy is not None else ():
        fields[key] = greedy[key]
    return StageResult(name=name, eval_set=eval_set, **fields)


def stage_order(stages: Sequence[StageResult]) -> list[str]:
    """Stage names in order of first appearance (pipeline order)."""
    return list(dict.fromkeys(s.name for s in stages))


def adapter_gains(
    eval_sets: Sequence[EvalSetInfo], stages: Sequence[StageResult]
) -> dict[str, dict[str, Metric]]:
    """stage -> eval set -> adapter_gain_retained (None where the base perplexity is unknown or the adapter
    did not change perplexity on that eval set)."""
    by_name = {e.name: e for e in eval_sets}
    gains: dict[str, dict[str, Metric]] = {}
    for s in stages:
        es = by_name[s.eval_set]
        known = es.ppl_base is not None and es.ppl_ref is not None and s.ppl is not None
        value = adapter_gain_retained(es.ppl_base, es.ppl_ref, s.ppl) if known else None
        gains.setdefault(s.name, {})[s.eval_set] = value
    return gains


def metric_table(stages: Sequence[StageResult], gains: Mapping[str, Mapping[str, Metric]]) -> dict:
    """stage -> eval set -> metric -> value: what gates are evaluated against."""
    table: dict[str, dict[str, dict[str, Metric]]] = {}
    for s in stages:
        row: dict[str, Metric] = {
            k: v for k, v in s.model_dump().items() if isinstance(v, float | int | None)
        }
        if s.vs_previous is not None:
            row |= {f"vs_previous.{k}": getattr(s.vs_previous, k) for k in COMPARISON_METRICS}
        row["adapter_gain_retained"] = gains.get(s.name, {}).get(s.eval_set)
        table.setdefault(s.name, {})[s.eval_set] = row
    return table


def _check_stages(eval_sets: Sequence[EvalSetInfo], stages: Sequence[StageResult]) -> None:
    names = {e.name for e in eval_sets}
    errors, seen = [], set()
    for s in stages:
        if s.eval_set not in names:
            errors.append(
                f"stage {s.name!r}: eval set {s.eval_set!r} is not in eval_sets ({', '.join(sorted(names))})"
            )
        if (s.name, s.eval_set) in seen:
            errors.append(
                f"stage {s.name!r}: eval set {s.eval_set!r} appears twice; give each stage one entry per set"
            )
        seen.add((s.name, s.eval_set))
    if not stages:
        errors.append("stages: the report needs at least one stage")
    if errors:
        raise InputError("\n".join(errors))


def build_report(
    artifact: ArtifactInfo,
    eval_sets: Sequence[EvalSetInfo],
    stages: Sequence[StageResult],
    gates: Sequence[str | Gate] = DEFAULT_GATES,
    layer_weight_error: Sequence[LayerError] | None = None,
    strict: bool = False,
    final_stage: str | None = None,
) -> Report:
    """Assemble the report: derive adapter gain, evaluate the gates (on `final_stage`, default the last stage;
    stages after it are informational, e.g. a runtime's default precision), set `passed`."""
    _check_stages(eval_sets, stages)
    gains = adapter_gains(eval_sets, stages)
    results = evaluate_gates(
        gates, metric_table(stages, gains), final_stage or stage_order(stages)[-1], strict
    )
    return Report(
        artifact=artifact,
        eval_sets=list(eval_sets),
        stages=list(stages),
        adapter_gain_retained=gains,
        layer_weight_error=None if layer_weight_error is None else list(layer_weight_error),
        gates=results,
        passed=all_passed(results),
    )


def regate(report: Report, gates: Sequence[str | Gate], strict: bool = False) -> Report:
    """The same report checked against other gates (e.g. `check report.json --gate ...`)."""
    results = evaluate_gates(
        gates,
        metric_table(report.stages, report.adapter_gain_retained),
        stage_order(report.stages)[-1],
        strict,
    )
    return report.model_copy(update={"gates": results, "passed": all_passed(results)})
