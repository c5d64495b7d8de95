"""Number formatting shared by the Markdown, HTML and diff writers (one look across all of them)."""

from __future__ import annotations

import math

DASH = "—"


def num(x: float | None, sig: int = 3) -> str:
    """0.0312 -> '0.0312', 2.3e-07 -> '2.3e-07', 0 -> '0', None -> '—'."""
    if x is None:
        return DASH
    if math.isnan(x) or math.isinf(x):
        return str(x).replace("inf", "∞").replace("nan", "NaN")
    return "0" if x == 0 else f"{x:.{sig}g}"


def pct(x: float | None) -> str:
    """A rate in [0, 1] as a percentage: 0.9431 -> '94.31%'."""
    if x is None or math.isnan(x):
        return num(x)
    return "100%" if x == 1 else f"{100 * x:.2f}%"


def ratio(x: float | None) -> str:
    """Perplexity ratio: 4 decimals, so 1.0000 vs 1.0012 is visible."""
    return num(x) if x is None or not math.isfinite(x) else f"{x:.4f}"


def signed(x: float | None, sig: int = 3) -> str:
    """A delta with its sign: '+0.0123', '-4.1e-05', '0'."""
    if x is None or not math.isfinite(x) or x == 0:
        return num(x)
    return f"{x:+.{sig}g}"


def kl_pm(mean: float | None, sem: float | None) -> str:
    """'0.0312 ± 0.0011' (mean ± standard error)."""
    return num(mean) if sem is None or math.isnan(sem) else f"{num(mean)} ± {num(sem, 2)}"


def status_icon(passed: bool | None) -> str:
    return {True: "✅", False: "❌", None: "⚠️"}[passed]
