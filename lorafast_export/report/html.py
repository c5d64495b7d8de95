"""report.html: one self-contained page (inline CSS and SVG, no external assets, no scripts)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from html import escape

from lorafast_export.report import fmt, svg
from lorafast_export.report.attribution import error_entry, stage_steps
from lorafast_export.report.html_style import CSS
from lorafast_export.report.schema import SCHEMA_ID, Report, StageResult, stage_order

SET_SHADES = ("#1e3a5f", "#7f9cc0", "#4b6a8f", "#b7c7dc", "#2f4f6f", "#a0b4cc")


def _stage_colors(report: Report) -> dict[str, str]:
    return {name: svg.PALETTE[i % len(svg.PALETTE)] for i, name in enumerate(stage_order(report.stages))}


def _set_names(report: Report) -> list[str]:
    return [e.name for e in report.eval_sets]


def _entry(report: Report, stage: str, eval_set: str) -> StageResult | None:
    return next((s for s in report.stages if s.name == stage and s.eval_set == eval_set), None)


# ----------------------------------------------------------------------------- sections


def header(report: Report) -> str:
    a = report.artifact
    cls, word = ("pass", "PASSED") if report.passed else ("fail", "FAILED")
    return (
        f"<header><div><h1>Validation report — {escape(a.name)}</h1>"
        f'<div class="meta">target <code>{escape(a.target)}</code>'
        f" · quantization <code>{escape(a.quant)}</code>"
        f" · reference: base + adapter, unmerged, FP32</div>{runtime_note(report)}</div>"
        f'<span class="badge {cls}">{word}</span></header>'
    )


def runtime_note(report: Report) -> str:
    """What ran the artifact stage when its target's runtime did not (empty when it did)."""
    notes = [n for n in (report.artifact.runtime_note, report.artifact.validation_note) if n]
    return "".join(f'<p class="runtime-note"><b>Note:</b> {escape(n)}</p>' for n in notes)


def cards(report: Report) -> str:
    steps = stage_steps(report)
    final = [s for s in report.stages if s.name == steps[-1].stage]
    tokens = sum(s.tokens for s in final)
    top1 = sum((s.top1 or 0) * s.tokens for s in final) / tokens if tokens else math.nan
    entry = error_entry(report)
    failed = sum(g.passed is False for g in report.gates)
    skipped = sum(g.passed is None for g in report.gates)
    gate_note = (
        ", ".join(f"{n} {w}" for n, w in ((failed, "failed"), (skipped, "skipped")) if n) or "none failed"
    )
    items = [
        ("Gates passed", f"{len(report.gates) - failed - skipped}/{len(report.gates)}", gate_note),
        ("KL mean, final", fmt.num(steps[-1].kl_vs_ref), f"nats/token vs reference · {steps[-1].stage}"),
        ("Same top-1, final", fmt.pct(top1), f"{tokens:,} tokens, all eval sets"),
        (
            "Error enters at",
            entry.stage if entry else fmt.DASH,
            f"step KL {fmt.num(entry.kl_step)}" if entry else "",
        ),
    ]
    return (
        '<div class="cards">'
        + "".join(
            f'<div class="card"><div class="k">{k}</div><div class="v">{escape(v)}</div>'
            f'<div class="s">{escape(s)}</div></div>'
            for k, v, s in items
        )
        + "</div>"
    )


def _bar_groups(report: Report, pick: Callable[[StageResult | None], tuple]) -> list[tuple]:
    """One bar group per eval set: (label, color, values per stage, errors per stage)."""
    stages = stage_order(report.stages)
    groups = []
    for i, es in enumerate(_set_names(report)):
        values, errors = zip(*[pick(_entry(report, st, es)) for st in stages], strict=True)
        groups.append((es, SET_SHADES[i % len(SET_SHADES)], values, errors))
    return groups


def _vs_previous_kl(s: StageResult | None) -> tuple[float | None, float | None]:
    return (s.vs_previous.kl_mean, s.vs_previous.kl_sem) if s and s.vs_previous else (None, None)


def attribution_section(report: Report) -> str:
    stages = stage_order(report.stages)
    entry = error_entry(report)
    vs_ref = _bar_groups(report, lambda s: (s.kl_mean, s.kl_sem) if s else (None, None))
    vs_prev = _bar_groups(report, _vs_previous_kl)
    lead = (
        ""
        if entry is None
        else f"Most of the error enters at <b>{escape(entry.stage)}</b>: its mean KL against "
        f"<code>{escape(entry.against)}</code> is {fmt.num(entry.kl_step)} nats/token, the largest step."
    )
    return (
        f'<section><h2>Where the error enters</h2><p class="lead">{lead}</p><div class="grid2">'
        + svg.hbar_chart(stages, vs_ref, "Mean KL vs reference", "nats / token (± s.e.m.)", fmt.num)
        + svg.hbar_chart(stages, vs_prev, "Mean KL vs previous stage", "nats / token (± s.e.m.)", fmt.num)
        + "</div></section>"
    )


def _gain(r: Report, s: StageResult) -> str:
    return fmt.pct(r.adapter_gain_retained.get(s.name, {}).get(s.eval_set))


_KEY_COLUMNS = (
    ("Stage", lambda r, s: f"<code>{escape(s.name)}</code>"),
    ("Eval set", lambda r, s: escape(s.eval_set)),
)
_DIST_COLUMNS = _KEY_COLUMNS + (
    ("Tokens", lambda r, s: f"{s.tokens:,}"),
    ("KL mean ± sem", lambda r, s: fmt.kl_pm(s.kl_mean, s.kl_sem)),
    ("median", lambda r, s: fmt.num(s.kl_median)),
    ("p90", lambda r, s: fmt.num(s.kl_p90)),
    ("p99", lambda r, s: fmt.num(s.kl_p99)),
    ("max", lambda r, s: fmt.num(s.kl_max)),
    ("Same top-1", lambda r, s: fmt.pct(s.top1)),
    ("KL vs previous", lambda r, s: fmt.num(s.vs_previous.kl_mean) if s.vs_previous else fmt.DASH),
)
_TASK_COLUMNS = _KEY_COLUMNS + (
    ("PPL", lambda r, s: fmt.num(s.ppl, 4)),
    ("PPL ratio", lambda r, s: fmt.ratio(s.ppl_ratio)),
    ("Δp mean", lambda r, s: fmt.signed(s.dp_mean, 2)),
    ("Δp p1 … p99", lambda r, s: f"{fmt.signed(s.dp_p1, 2)} … {fmt.signed(s.dp_p99, 2)}"),
    ("Δp rms", lambda r, s: fmt.num(s.dp_rms, 2)),
    ("Greedy match", lambda r, s: fmt.pct(s.greedy_match)),
    ("1st divergence", lambda r, s: fmt.num(s.first_divergence_mean)),
    ("Adapter gain kept", _gain),
)
_STAGE_NOTE = (
    "KL = KL(reference ‖ stage) in nats per token. Δp = p<sub>stage</sub>(label) − p<sub>ref</sub>(label). "
    "Greedy match = share of prompts whose greedy continuation is identical to the reference; "
    "1st divergence = mean index of the first differing new token. "
    "Adapter gain kept = (ppl<sub>base</sub> − ppl) / (ppl<sub>base</sub> − ppl<sub>ref</sub>)."
)


def _table(report: Report, columns) -> str:
    head = "".join(
        f"<th{' class=l' if i < len(_KEY_COLUMNS) else ''}>{escape(c)}</th>"
        for i, (c, _) in enumerate(columns)
    )
    rows, prev = [], None
    for s in report.stages:
        cls = ' class="first"' if prev is not None and s.name != prev else ""
        cells = "".join(
            f"<td{' class=l' if i < len(_KEY_COLUMNS) else ''}>{f(report, s)}</td>"
            for i, (_, f) in enumerate(columns)
        )
        rows.append(f"<tr{cls}>{cells}</tr>")
        prev = s.name
    body = "".join(rows)
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def stage_table(report: Report) -> str:
    return (
        f"<section><h2>Stages: distribution vs reference</h2>{_table(report, _DIST_COLUMNS)}"
        f'<h2 class="sub">Stages: task metrics</h2>{_table(report, _TASK_COLUMNS)}'
        f'<p class="note">{_STAGE_NOTE}</p></section>'
    )


def _position_chart(report: Report, eval_set: str, colors: dict[str, str]) -> str:
    series = [
        svg.Series(
            s.name,
            [((b.start + b.end) / 2, b.kl_mean) for b in s.kl_by_position if b.kl_mean is not None],
            colors[s.name],
        )
        for s in report.stages
        if s.eval_set == eval_set
    ]
    return svg.line_chart(
        series, f"KL along the sequence — {eval_set}", "token position", "mean KL (log)", log_y=True
    )


def _hist_points(s: StageResult) -> list[tuple[float, float]]:
    h = s.kl_hist
    total = sum(h.counts) + h.underflow + h.overflow or 1
    # one more bin on the left holds KL < edges[0], exact zeros included
    below = h.edges[0] / (h.edges[1] / h.edges[0])
    bins = [(below, h.edges[0], h.underflow)] + list(zip(h.edges[:-1], h.edges[1:], h.counts, strict=True))
    return [p for lo, hi, c in bins for p in ((lo, 100 * c / total), (hi, 100 * c / total))]


def _hist_chart(report: Report, eval_set: str, colors: dict[str, str]) -> str:
    series = [
        svg.Series(s.name, _hist_points(s), colors[s.name])
        for s in report.stages
        if s.eval_set == eval_set and s.kl_hist is not None
    ]
    return svg.line_chart(
        series,
        f"Per-token KL distribution — {eval_set}",
        "KL (nats, log scale)",
        "% of tokens",
        log_x=True,
        fill=True,
    )


def distribution_sections(report: Report) -> str:
    colors = _stage_colors(report)
    sets = _set_names(report)
    pos = "".join(_position_chart(report, es, colors) for es in sets)
    hist = "".join(_hist_chart(report, es, colors) for es in sets)
    first_edge = next((s.kl_hist.edges[0] for s in report.stages if s.kl_hist), None)
    note = (
        f"The leftmost bin holds KL below {fmt.num(first_edge)} (exact zeros included)." if first_edge else ""
    )
    return (
        f'<section><h2>KL along positions</h2><div class="grid2">{pos}</div>'
        '<p class="note">Mean KL per bucket of token positions, log scale. Error that grows with position '
        "points at attention / KV-cache / RoPE lowering rather than weight quantization.</p></section>"
        f'<section><h2>KL histogram</h2><div class="grid2">{hist}</div><p class="note">{note}</p></section>'
    )


def layer_section(report: Report) -> str:
    errors = report.layer_weight_error
    if not errors:
        return ""
    kinds = list(dict.fromkeys(e.module.rsplit(".", 1)[-1] for e in errors))
    color = {k: svg.PALETTE[i % len(svg.PALETTE)] for i, k in enumerate(kinds)}
    layers = [
        (i, e.layer)
        for i, e in enumerate(errors)
        if e.layer is not None and (i == 0 or errors[i - 1].layer != e.layer)
    ]
    every = max(1, math.ceil(len(layers) / 16))
    chart = svg.vbar_chart(
        [e.rel_error for e in errors],
        [color[e.module.rsplit(".", 1)[-1]] for e in errors],
        [(i, str(layer)) for i, layer in layers[::every]],
        [(k, color[k]) for k in kinds],
        "Relative weight error per quantized module",
        "decoder layer",
        "‖W_q − W‖ / ‖W‖",
    )
    worst = max(errors, key=lambda e: e.rel_error)
    return (
        f"<section><h2>Per-layer weight error</h2>{chart}"
        f'<p class="note">Largest: <code>{escape(worst.module)}</code>'
        f" at {fmt.num(worst.rel_error)}.</p></section>"
    )


def gates_section(report: Report) -> str:
    rows = []
    for g in report.gates:
        cls, word = {True: ("ok", "pass"), False: ("bad", "FAIL"), None: ("warn", "skipped")}[g.passed]
        rows.append(
            f'<tr class="gate-{cls}"><td class="l"><code>{escape(g.expr)}</code></td>'
            f"<td>{fmt.num(g.value, 4)}</td><td>{escape(g.op)} {g.threshold:g}</td>"
            f'<td class="{cls}">{word}</td><td class="l wrap">{escape(g.note)}</td></tr>'
        )
    body = "".join(rows) or '<tr><td class="l" colspan="5">No gates configured.</td></tr>'
    return (
        '<section><h2>Gates</h2><div class="scroll"><table><thead><tr><th class="l">Gate</th><th>Value</th>'
        '<th>Threshold</th><th>Result</th><th class="l">Note</th></tr></thead>'
        f"<tbody>{body}</tbody></table></div></section>"
    )


def eval_sets_section(report: Report) -> str:
    rows = "".join(
        f"<tr><td>{escape(e.name)}</td><td>{e.sequences if e.sequences is not None else fmt.DASH}</td>"
        f"<td>{e.tokens:,}</td><td>{fmt.num(e.ppl_ref, 4)}</td><td>{fmt.num(e.ppl_base, 4)}</td></tr>"
        for e in report.eval_sets
    )
    return (
        "<section><h2>Eval sets</h2><table><thead><tr><th>Name</th><th>Sequences</th><th>Tokens</th>"
        "<th>PPL reference</th><th>PPL base (no adapter)</th></tr></thead>"
        f"<tbody>{rows}</tbody></table></section>"
    )


def render_html(report: Report, sections: Sequence[str] | None = None) -> str:
    parts = sections or [
        header(report),
        cards(report),
        attribution_section(report),
        stage_table(report),
        distribution_sections(report),
        layer_section(report),
        gates_section(report),
        eval_sets_section(report),
    ]
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>lorafast-export — {escape(report.artifact.name)}</title><style>{CSS}</style></head>"
        f"<body><main>{''.join(parts)}<footer>{SCHEMA_ID} · generated by lorafast-export</footer>"
        "</main></body></html>\n"
    )
