"""report.html is one self-contained page with well-formed inline SVG plots."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

from lorafast_export.report.html import render_html


def _svgs(html: str) -> list[ET.Element]:
    return [ET.fromstring(block) for block in re.findall(r"<svg\b.*?</svg>", html, flags=re.S)]


def test_self_contained_with_plots(sample_report):
    html = render_html(sample_report)
    assert html.startswith("<!doctype html>") and html.rstrip().endswith("</html>")
    assert "<script" not in html and "<link" not in html and " src=" not in html and "url(" not in html
    assert set(re.findall(r"https?://[^\"' ]+", html)) == {"http://www.w3.org/2000/svg"}
    titles = [svg.get("aria-label") for svg in _svgs(html)]
    assert titles == [
        "Mean KL vs reference",
        "Mean KL vs previous stage",
        "KL along the sequence — prose",
        "KL along the sequence — code",
        "Per-token KL distribution — prose",
        "Per-token KL distribution — code",
        "Relative weight error per quantized module",
    ]
    assert "Most of the error enters at <b>quantized</b>" in html
    assert html.count('class="ok">pass<') == 6
    for name in ("merged-fp32", "merged-fp16", "quantized", "artifact"):
        assert f"<code>{name}</code>" in html


def test_without_layer_errors_and_failing(failing_report):
    html = render_html(failing_report.model_copy(update={"layer_weight_error": None}))
    assert "Per-layer weight error" not in html
    assert len(_svgs(html)) == 6
    assert 'class="badge fail">FAILED<' in html and html.count('class="bad">FAIL<') == 6


def test_names_are_escaped(sample_report):
    art = sample_report.artifact.model_copy(update={"name": "<b>x&y</b>"})
    html = render_html(sample_report.model_copy(update={"artifact": art}))
    assert "<b>x&y</b>" not in html and "&lt;b&gt;x&amp;y&lt;/b&gt;" in html
