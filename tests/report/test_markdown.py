"""report.md fits a pull-request comment; the GitHub step summary gets it appended."""

from __future__ import annotations

from lorafast_export.report.github import SUMMARY_ENV, append_step_summary
from lorafast_export.report.markdown import MAX_GATE_LINES, render_markdown
from lorafast_export.report.schema import regate


def test_short_and_complete(sample_report):
    md = render_markdown(sample_report)
    lines = md.splitlines()
    assert len(lines) <= 60
    assert lines[0].startswith("### ✅ passed: `llama-demo-lora` → torch_compile · gptq-w4-g128")
    assert "| Stage | Eval set | KL mean ± sem (nats) | KL p99 | Top-1 | PPL ratio |" in md
    assert sum(line.startswith("| `") for line in lines) == len(sample_report.stages)
    assert "**Where the error enters:** `quantized`, the largest step" in md
    assert md.count("✅ `stage:artifact.") == 6


def test_failed_gates_come_first(sample_report):
    md = render_markdown(regate(sample_report, ["kl_mean<=1", "top1>=0.9999"]))
    gate_lines = [line for line in md.splitlines() if line.startswith("- ")]
    assert [line[2] for line in gate_lines] == ["❌", "❌", "✅", "✅"]


def test_failures_are_marked(failing_report):
    md = render_markdown(failing_report)
    assert md.startswith("### ❌ FAILED")
    assert "0/6 gates passed, 6 failed" in md
    assert "❌ `stage:artifact.prose.kl_mean<=0.05` — value" in md


def test_many_gates_stay_short(sample_report):
    metrics = ("kl_mean", "kl_median", "kl_p90", "kl_p99", "kl_max")
    gates = [f"stage:{s}.{m}<=1" for s in ("quantized", "artifact") for m in metrics]
    gates += ["stage:quantized.kl_mean<=1e-9"]  # fails
    md = render_markdown(regate(sample_report, gates))
    assert len(md.splitlines()) <= 60
    assert "❌ `stage:quantized.prose.kl_mean<=1e-09`" in md
    assert "- … and 20 more gates (20/22 gates passed, 2 failed)" in md
    assert sum(line.startswith("- ") for line in md.splitlines()) <= MAX_GATE_LINES + 1


def test_github_step_summary(sample_report, tmp_path):
    target = tmp_path / "summary.md"
    target.write_text("previous step\n")
    assert append_step_summary(sample_report, env={}) is None
    assert append_step_summary(sample_report, env={SUMMARY_ENV: str(target)}) == target
    text = target.read_text()
    assert text.startswith("previous step\n") and "Where the error enters" in text
