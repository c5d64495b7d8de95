"""Tiny inline-SVG charts for report.html: line/step charts and bar charts, no plotting library.

Each chart is a pure function from data to an <svg> string with a viewBox, so it scales with the page.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from html import escape

# Okabe-Ito: distinguishable with the common colour-vision deficiencies.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000")
FONT = 11
MARGIN = {"left": 62, "right": 14, "top": 50, "bottom": 40}
DASHES = ("", "6 3", "2 2", "9 3 2 3")  # per-series dash patterns: overlapping lines stay visible


@dataclass(frozen=True)
class Series:
    label: str
    points: Sequence[tuple[float, float]]
    color: str


@dataclass(frozen=True)
class Scale:
    lo: float
    hi: float
    px_lo: float
    px_hi: float
    log: bool = False

    def __call__(self, v: float) -> float:
        f = self._t
        v = min(max(v, self.lo), self.hi)
        return self.px_lo + (f(v) - f(self.lo)) / ((f(self.hi) - f(self.lo)) or 1.0) * (
            self.px_hi - self.px_lo
        )

    def _t(self, v: float) -> float:
        return math.log10(v) if self.log else v

    def ticks(self, n: int = 5) -> list[float]:
        if self.log:
            lo, hi = math.floor(math.log10(self.lo)), math.ceil(math.log10(self.hi))
            every = max(1, math.ceil((hi - lo) / 6))
            return [
                10.0**e
                for e in range(lo, hi + 1)
                if e % every == 0 and self.lo <= 10.0**e <= self.hi * 1.0001
            ]
        step = _nice_step((self.hi - self.lo) / n)
        first = math.ceil(self.lo / step) * step
        return [first + i * step for i in range(int((self.hi - first) / step + 1e-9) + 1)]


def _nice_step(raw: float) -> float:
    if raw <= 0:
        return 1.0
    mag = 10 ** math.floor(math.log10(raw))
    return next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)


def tick_label(v: float, log: bool = False) -> str:
    if log:
        return f"1e{round(math.log10(v))}" if abs(math.log10(v)) > 2 else f"{v:g}"
    return f"{v:.3g}"


def log_range(values: Sequence[float], max_decades: int = 14) -> tuple[float, float]:
    """Decade-aligned [lo, hi] covering the positive finite values, at most `max_decades` wide."""
    pos = [v for v in values if v > 0 and math.isfinite(v)] or [1e-12, 1.0]
    hi = 10.0 ** math.ceil(math.log10(max(pos)))
    lo = 10.0 ** math.floor(math.log10(min(pos)))
    return max(lo, hi / 10.0**max_decades), hi if hi > lo else lo * 10


# ----------------------------------------------------------------------------- building blocks


def _text(x: float, y: float, s: str, anchor: str = "middle", cls: str = "", extra: str = "") -> str:
    c = f' class="{cls}"' if cls else ""
    return f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}"{c}{extra}>{escape(s)}</text>'


def _frame(
    width: int, height: int, title: str, body: list[str], legend: Sequence[tuple[str, ...]] = ()
) -> str:
    """legend entries: (label, color) for a box swatch or (label, color, dasharray) for a line swatch."""
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="{escape(title)}" font-size="{FONT}" class="chart">',
        _text(MARGIN["left"], 16, title, "start", "title"),
    ]
    x = MARGIN["left"]
    for label, color, *dash in legend:  # legend row under the title
        if dash:
            dash_attr = f' stroke-dasharray="{dash[0]}"' if dash[0] else ""
            parts.append(
                f'<line x1="{x:.1f}" x2="{x + 14:.1f}" y1="27" y2="27" stroke="{color}" '
                f'stroke-width="2.2"{dash_attr}/>'
            )
        else:
            parts.append(f'<rect x="{x:.1f}" y="22" width="10" height="10" rx="2" fill="{color}"/>')
        parts.append(_text(x + 18, 31, label, "start", "legend"))
        x += 30 + 6.3 * len(label)
    return "\n".join(parts + body + ["</svg>"])


def _y_axis(sy: Scale, x0: float, x1: float, label: str) -> list[str]:
    out = []
    for t in sy.ticks():
        y = sy(t)
        out.append(f'<line x1="{x0}" x2="{x1}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>')
        out.append(_text(x0 - 6, y + 4, tick_label(t, sy.log), "end", "tick"))
    mid = (sy.px_lo + sy.px_hi) / 2
    out.append(_text(14, mid, label, "middle", "axis", f' transform="rotate(-90 14 {mid:.1f})"'))
    return out


def _x_axis(sx: Scale, y0: float, label: str, fmt: Callable[[float], str] | None = None) -> list[str]:
    out = [f'<line x1="{sx.px_lo}" x2="{sx.px_hi}" y1="{y0}" y2="{y0}" class="axisline"/>']
    for t in sx.ticks():
        x = sx(t)
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{y0}" y2="{y0 + 4}" class="axisline"/>')
        out.append(_text(x, y0 + 16, fmt(t) if fmt else tick_label(t, sx.log), "middle", "tick"))
    out.append(_text((sx.px_lo + sx.px_hi) / 2, y0 + 32, label, "middle", "axis"))
    return out


def _path(points: Sequence[tuple[float, float]], sx: Scale, sy: Scale) -> str:
    return " ".join(f"{'M' if i == 0 else 'L'}{sx(x):.1f},{sy(y):.1f}" for i, (x, y) in enumerate(points))


# ----------------------------------------------------------------------------- charts


def line_chart(
    series: Sequence[Series],
    title: str,
    x_label: str,
    y_label: str,
    log_y: bool = False,
    log_x: bool = False,
    width: int = 520,
    height: int = 280,
    x_fmt: Callable[[float], str] | None = None,
    fill: bool = False,
) -> str:
    """Lines (with dots when sparse); `fill` shades the area under each line, for histograms."""
    xs = [x for s in series for x, _ in s.points]
    ys = [y for s in series for _, y in s.points if math.isfinite(y)]
    if not xs:
        return _frame(width, height, title, [_text(width / 2, height / 2, "no data", "middle", "tick")])
    x_lo, x_hi = (min(xs), max(xs)) if min(xs) < max(xs) else (min(xs) - 1, max(xs) + 1)
    sx = Scale(x_lo, x_hi, MARGIN["left"], width - MARGIN["right"], log_x)
    y_lo, y_hi = log_range(ys) if log_y else (0.0, max(ys, default=1.0) * 1.08 or 1.0)
    y0 = height - MARGIN["bottom"]
    sy = Scale(y_lo, y_hi, y0, MARGIN["top"], log_y)
    body = _y_axis(sy, MARGIN["left"], width - MARGIN["right"], y_label) + _x_axis(sx, y0, x_label, x_fmt)
    for k, s in enumerate(series):
        pts = [(x, y) for x, y in s.points if math.isfinite(y)]
        dash = f' stroke-dasharray="{DASHES[k % len(DASHES)]}"' if DASHES[k % len(DASHES)] else ""
        d = _path(pts, sx, sy)
        if fill and pts:
            body.append(
                f'<path d="{d} L{sx(pts[-1][0]):.1f},{y0} L{sx(pts[0][0]):.1f},{y0} Z" '
                f'fill="{s.color}" fill-opacity="0.12" stroke="none"/>'
            )
        body.append(
            f'<path d="{d}" fill="none" stroke="{s.color}" stroke-width="1.8" stroke-linejoin="round"{dash}/>'
        )
        if len(pts) <= 40 and not fill and not dash:
            body += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.2" fill="{s.color}"/>' for x, y in pts]
    legend = [(s.label, s.color, DASHES[k % len(DASHES)]) for k, s in enumerate(series)]
    return _frame(width, height, title, body, legend)


def hbar_chart(
    categories: Sequence[str],
    groups: Sequence[tuple[str, str, Sequence[float | None], Sequence[float | None]]],
    title: str,
    x_label: str,
    value_fmt: Callable[[float | None], str],
    width: int = 520,
) -> str:
    """Horizontal grouped bars: one row per category, one bar per group (label, color, values, errors)."""
    bar, gap = 12, 10
    row_h = len(groups) * bar + gap
    left = 110
    height = MARGIN["top"] + len(categories) * row_h + MARGIN["bottom"]
    vals = [
        v + (e or 0)
        for _, _, vs, es in groups
        for v, e in zip(vs, es, strict=True)
        if v is not None and math.isfinite(v)
    ]
    sx = Scale(0.0, (max(vals, default=0) or 1.0) * 1.25, left, width - MARGIN["right"])
    y0 = height - MARGIN["bottom"]
    body = [f'<line x1="{left}" x2="{left}" y1="{MARGIN["top"]}" y2="{y0}" class="axisline"/>']
    body += _x_axis(sx, y0, x_label)
    for i, cat in enumerate(categories):
        top = MARGIN["top"] + i * row_h + gap / 2
        body.append(_text(left - 8, top + len(groups) * bar / 2 + 4, cat, "end", "cat"))
        for j, (_, color, values, errors) in enumerate(groups):
            v, e, y = values[i], errors[i], top + j * bar
            finite = v is not None and math.isfinite(v)
            w = sx(v) - left if finite else 0.0
            body.append(
                f'<rect x="{left}" y="{y:.1f}" width="{w:.1f}" height="{bar - 2}" fill="{color}" rx="1.5"/>'
            )
            if finite and e:
                x_a, x_b, ym = sx(v - e), sx(v + e), y + (bar - 2) / 2
                body.append(
                    f'<path d="M{x_a:.1f},{ym:.1f} H{x_b:.1f} M{x_a:.1f},{ym - 3:.1f} V{ym + 3:.1f} '
                    f'M{x_b:.1f},{ym - 3:.1f} V{ym + 3:.1f}" class="err"/>'
                )
            label_x = max(sx(v + e) if finite and e else left + w, left) + 4
            body.append(_text(label_x, y + bar - 3, value_fmt(v), "start", "value"))
    return _frame(width, height, title, body, [(g[0], g[1]) for g in groups])


def vbar_chart(
    values: Sequence[float],
    colors: Sequence[str],
    x_ticks: Sequence[tuple[int, str]],
    legend: Sequence[tuple[str, str]],
    title: str,
    x_label: str,
    y_label: str,
    width: int = 1060,
    height: int = 260,
) -> str:
    """Thin vertical bars, e.g. one per quantized module; x_ticks = (bar index, label)."""
    n = max(len(values), 1)
    y0 = height - MARGIN["bottom"]
    finite = [v for v in values if math.isfinite(v)]
    sy = Scale(0.0, (max(finite, default=0) or 1.0) * 1.1, y0, MARGIN["top"])
    plot_w = width - MARGIN["left"] - MARGIN["right"]
    step = plot_w / n
    body = _y_axis(sy, MARGIN["left"], width - MARGIN["right"], y_label)
    body.append(
        f'<line x1="{MARGIN["left"]}" x2="{width - MARGIN["right"]}" y1="{y0}" y2="{y0}" class="axisline"/>'
    )
    for i, (v, c) in enumerate(zip(values, colors, strict=True)):
        top = sy(v) if math.isfinite(v) else MARGIN["top"]
        body.append(
            f'<rect x="{MARGIN["left"] + i * step + step * 0.1:.2f}" y="{top:.1f}" '
            f'width="{max(step * 0.8, 0.8):.2f}" height="{y0 - top:.1f}" fill="{c}"/>'
        )
    for i, label in x_ticks:
        body.append(_text(MARGIN["left"] + (i + 0.5) * step, y0 + 16, label, "middle", "tick"))
    body.append(_text(MARGIN["left"] + plot_w / 2, y0 + 32, x_label, "middle", "axis"))
    return _frame(width, height, title, body, legend)
