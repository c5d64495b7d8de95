"""Where does the error enter? Per-stage steps of KL, pooled over eval sets (token-weighted)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from lorafast_export.report.schema import Report, StageResult, stage_order


@dataclass(frozen=True)
class Step:
    stage: str
    against: str  # the previous stage, or "reference" for the first one
    kl_vs_ref: float  # token-weighted mean KL of this stage vs the reference
    kl_step: float  # token-weighted mean KL of this stage vs the previous stage's logits


def _pooled(entries: Sequence[StageResult], values: Sequence[float | None]) -> float:
    pairs = [(e.tokens, v) for e, v in zip(entries, values, strict=True) if v is not None]
    total = sum(t for t, _ in pairs)
    return sum(t * v for t, v in pairs) / total if total else math.nan


def stage_steps(report: Report) -> list[Step]:
    """One Step per stage in pipeline order. The step is the stage's KL against the previous stage's logits
    when measured (vs_previous), else the increase of KL-vs-reference over the previous stage."""
    steps: list[Step] = []
    for name in stage_order(report.stages):
        entries = [s for s in report.stages if s.name == name]
        kl_ref = _pooled(entries, [e.kl_mean for e in entries])
        measured = [e.vs_previous.kl_mean if e.vs_previous else None for e in entries]
        if any(v is not None for v in measured):
            step = _pooled(entries, measured)
        else:
            step = kl_ref - (steps[-1].kl_vs_ref if steps else 0.0)
        against = next(
            (e.vs_previous.against for e in entries if e.vs_previous),
            steps[-1].stage if steps else "reference",
        )
        steps.append(Step(name, against, kl_ref, step))
    return steps


def error_entry(report: Report) -> Step | None:
    """The stage where most of the error enters: the first stage whose step is NaN/inf (it broke), else the
    stage with the largest KL step against its previous stage."""
    steps = stage_steps(report)
    broken = next((s for s in steps if not math.isfinite(s.kl_step)), None)
    return broken or max(steps, key=lambda s: s.kl_step, default=None)
