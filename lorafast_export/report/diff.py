"""Two artifacts' reports side by side (GPTQ vs AWQ, PR vs main): stage metrics and gates, with deltas."""

from __future__ import annotations

from collections.abc import Callable

from lorafast_export.report import fmt
from lorafast_export.report.schema import Report, StageResult, stage_order
from lorafast_export.validate.gates import GateResult

Getter = Callable[[Report, StageResult], float | None]
Show = Callable[[float | None], str]


def _pp(delta: float | None) -> str:
    """A difference of two rates in percentage points."""
    return fmt.DASH if delta is None else ("0 pp" if delta == 0 else f"{100 * delta:+.2f} pp")


# (column, getter, value formatter, delta formatter): the metrics a diff shows per stage and eval set.
DIFF_METRICS: tuple[tuple[str, Getter, Show, Show], ...] = (
    ("KL mean", lambda r, s: s.kl_mean, fmt.num, lambda d: fmt.signed(d, 2)),
    ("KL p99", lambda r, s: s.kl_p99, fmt.num, lambda d: fmt.signed(d, 2)),
    ("Top-1", lambda r, s: s.top1, fmt.pct, _pp),
    ("PPL ratio", lambda r, s: s.ppl_ratio, fmt.ratio, lambda d: fmt.signed(d, 3)),
    ("Greedy", lambda r, s: s.greedy_match, fmt.pct, _pp),
    ("Gain kept", lambda r, s: r.adapter_gain_retained.get(s.name, {}).get(s.eval_set), fmt.pct, _pp),
)


def _compare(a: float | None, b: float | None, show: Show, show_delta: Show) -> str:
    """'0.014 → 0.458 (+0.44)'; one side missing: just what exists."""
    if a is None or b is None:
        return f"{show(a)} → {show(b)}"
    return f"{show(a)} → {show(b)} ({show_delta(b - a)})"


def _stage_keys(a: Report, b: Report) -> list[tuple[str, str]]:
    """(stage, eval set) pairs of both reports: a's order first, then what only b has."""
    keys = [(s.name, s.eval_set) for s in a.stages]
    return keys + [(s.name, s.eval_set) for s in b.stages if (s.name, s.eval_set) not in keys]


def _find(report: Report, stage: str, eval_set: str) -> StageResult | None:
    return next((s for s in report.stages if s.name == stage and s.eval_set == eval_set), None)


def _cell(report: Report, entry: StageResult | None, get: Getter) -> float | None:
    return None if entry is None else get(report, entry)


def stage_rows(a: Report, b: Report) -> list[str]:
    head = " | ".join(name for name, *_ in DIFF_METRICS)
    lines = [f"| Stage | Eval set | {head} |", "|---|---|" + "--:|" * len(DIFF_METRICS)]
    for stage, eval_set in _stage_keys(a, b):
        ea, eb = _find(a, stage, eval_set), _find(b, stage, eval_set)
        cells = [
            _compare(_cell(a, ea, get), _cell(b, eb, get), show, delta)
            for _, get, show, delta in DIFF_METRICS
        ]
        lines.append(f"| `{stage}` | {eval_set} | " + " | ".join(cells) + " |")
    return lines


def _gate_cell(g: GateResult | None) -> str:
    return fmt.DASH if g is None else f"{fmt.status_icon(g.passed)} {fmt.num(g.value, 4)}"


def gate_rows(a: Report, b: Report) -> list[str]:
    ga, gb = {g.expr: g for g in a.gates}, {g.expr: g for g in b.gates}
    lines = ["| Gate | A | B | Δ |", "|---|--:|--:|--:|"]
    for expr in list(ga) + [e for e in gb if e not in ga]:
        x, y = ga.get(expr), gb.get(expr)
        va, vb = (x.value if x else None), (y.value if y else None)
        delta = fmt.DASH if va is None or vb is None else fmt.signed(vb - va, 2)
        lines.append(f"| `{expr}` | {_gate_cell(x)} | {_gate_cell(y)} | {delta} |")
    return lines


def _label(tag: str, r: Report) -> str:
    a = r.artifact
    verdict = f"{fmt.status_icon(r.passed)} {'passed' if r.passed else 'FAILED'}"
    return f"**{tag}** `{a.name}` → {a.target} · {a.quant}: {verdict}"


def render_diff(report_a: Report, report_b: Report) -> str:
    """Markdown comparing two reports: each cell reads A → B (Δ = B − A)."""
    only = sorted(set(stage_order(report_a.stages)) ^ set(stage_order(report_b.stages)))
    lines = [
        "### lorafast-export report diff: A → B (Δ = B − A)",
        "",
        f"- {_label('A', report_a)}",
        f"- {_label('B', report_b)}",
        *([f"- stages in only one report: {', '.join(only)}"] if only else []),
        "",
        *stage_rows(report_a, report_b),
        "",
        "**Gates**",
        "",
        *gate_rows(report_a, report_b),
    ]
    return "\n".join(lines) + "\n"
