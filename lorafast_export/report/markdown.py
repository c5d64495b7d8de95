"""report.md: a short summary that fits a pull-request comment or a CI job summary."""

from __future__ import annotations

from collections.abc import Sequence

from lorafast_export.report import fmt
from lorafast_export.report.attribution import error_entry, stage_steps
from lorafast_export.report.schema import SCHEMA_ID, Report, StageResult
from lorafast_export.validate.gates import GateResult

MAX_GATE_LINES = 15  # beyond this, passing gates are counted instead of listed


def gate_counts(gates: Sequence[GateResult]) -> str:
    """'4/6 gates passed, 2 failed'"""
    failed = sum(g.passed is False for g in gates)
    skipped = sum(g.passed is None for g in gates)
    text = f"{len(gates) - failed - skipped}/{len(gates)} gates passed"
    return text + (f", {failed} failed" if failed else "") + (f", {skipped} skipped" if skipped else "")


def header(report: Report) -> list[str]:
    a = report.artifact
    sets = ", ".join(f"{e.name} ({e.tokens:,} tokens)" for e in report.eval_sets)
    verdict = "passed" if report.passed else "FAILED"
    return [
        f"### {fmt.status_icon(report.passed)} {verdict}: `{a.name}` → {a.target} · {a.quant}",
        "",
        f"**{gate_counts(report.gates)}** · eval sets: {sets}",
        *(["", f"> **Note:** {a.runtime_note}"] if a.runtime_note else []),
        *(["", f"> **Note:** {a.validation_note}"] if a.validation_note else []),
    ]


def _stage_row(report: Report, s: StageResult) -> str:
    gain = report.adapter_gain_retained.get(s.name, {}).get(s.eval_set)
    cells = [
        f"`{s.name}`",
        s.eval_set,
        fmt.kl_pm(s.kl_mean, s.kl_sem),
        fmt.num(s.kl_p99),
        fmt.pct(s.top1),
        fmt.ratio(s.ppl_ratio),
        fmt.pct(s.greedy_match),
        fmt.pct(gain),
    ]
    return "| " + " | ".join(cells) + " |"


def stage_table(report: Report) -> list[str]:
    return [
        "| Stage | Eval set | KL mean ± sem (nats) | KL p99 | Top-1 | PPL ratio | Greedy match "
        "| Adapter gain kept |",
        "|---|---|--:|--:|--:|--:|--:|--:|",
        *(_stage_row(report, s) for s in report.stages),
    ]


def entry_line(report: Report) -> str:
    steps = stage_steps(report)
    step = error_entry(report)
    if step is None:
        return "**Where the error enters:** no stage metrics."
    return (
        f"**Where the error enters:** `{step.stage}`, the largest step: mean KL {fmt.num(step.kl_step)} "
        f"nats/token against `{step.against}` (final `{steps[-1].stage}`: {fmt.num(steps[-1].kl_vs_ref)} "
        "vs the reference)."
    )


def gate_line(g: GateResult) -> str:
    note = f" ({g.note})" if g.note else ""
    return f"- {fmt.status_icon(g.passed)} `{g.expr}` — value {fmt.num(g.value, 4)}{note}"


def gate_lines(gates: Sequence[GateResult]) -> list[str]:
    """Failed first, then skipped, then passed; past MAX_GATE_LINES the passing ones are only counted."""
    ordered = sorted(gates, key=lambda g: {False: 0, None: 1, True: 2}[g.passed])
    if len(ordered) <= MAX_GATE_LINES:
        return [gate_line(g) for g in ordered]
    shown = [g for g in ordered if g.passed is not True][:MAX_GATE_LINES]
    rest = len(gates) - len(shown)
    return [gate_line(g) for g in shown] + [f"- … and {rest} more gates ({gate_counts(gates)})"]


def render_markdown(report: Report) -> str:
    lines = [
        *header(report),
        "",
        *stage_table(report),
        "",
        entry_line(report),
        "",
        "**Gates**" if report.gates else "**Gates:** none configured.",
        *gate_lines(report.gates),
        "",
        f"<sub>KL = KL(reference ‖ stage) per token; reference = base + adapter unmerged, FP32. "
        f"Plots: report.html · {SCHEMA_ID}</sub>",
    ]
    return "\n".join(lines) + "\n"
