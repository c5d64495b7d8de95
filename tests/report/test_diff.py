"""Two reports side by side with deltas."""

from __future__ import annotations

from lorafast_export.report.diff import render_diff


def test_diff_of_two_reports(sample_report, failing_report):
    text = render_diff(sample_report, failing_report)
    lines = text.splitlines()
    assert "**A** `llama-demo-lora`" in text and "**B** `llama-demo-broken`" in text and "❌ FAILED" in text
    quantized = next(line for line in lines if line.startswith("| `quantized` | prose"))
    a = next(s for s in sample_report.stages if s.name == "quantized" and s.eval_set == "prose")
    b = next(s for s in failing_report.stages if s.name == "quantized" and s.eval_set == "prose")
    assert f"{a.kl_mean:.3g} → {b.kl_mean:.3g} ({b.kl_mean - a.kl_mean:+.2g})" in quantized
    assert f"({100 * (b.top1 - a.top1):+.2f} pp)" in quantized
    gate = next(line for line in lines if line.startswith("| `stage:artifact.prose.kl_mean<=0.05`"))
    assert "✅" in gate and "❌" in gate


def test_stages_in_only_one_report(sample_report):
    fewer = sample_report.model_copy(
        update={"stages": [s for s in sample_report.stages if s.name != "quantized"]}
    )
    text = render_diff(fewer, sample_report)
    assert "stages in only one report: quantized" in text
    assert "| `quantized` | prose | — → " in text
