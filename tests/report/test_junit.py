"""JUnit XML: one testcase per gate; failures carry value and threshold."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from lorafast_export.report.junit import render_junit
from lorafast_export.report.schema import build_report


def test_valid_junit(failing_report):
    root = ET.fromstring(render_junit(failing_report))
    suite = root.find("testsuite")
    cases = suite.findall("testcase")
    assert suite.get("tests") == str(len(cases)) == str(len(failing_report.gates))
    assert suite.get("failures") == "6"
    failure = cases[0].find("failure")
    assert cases[0].get("name") == "stage:artifact.prose.kl_mean<=0.05"
    assert "kl_mean = 0." in failure.get("message") and "required <= 0.05" in failure.get("message")


def test_passing_and_skipped(sample_report):
    flat = [e.model_copy(update={"ppl_base": e.ppl_ref}) for e in sample_report.eval_sets]
    report = build_report(sample_report.artifact, flat, sample_report.stages)
    suite = ET.fromstring(render_junit(report)).find("testsuite")
    assert (suite.get("failures"), suite.get("skipped")) == ("0", "2")
    skipped = [c for c in suite.findall("testcase") if c.find("skipped") is not None]
    assert all("adapter_gain_retained" in c.get("name") for c in skipped)
    assert "did not change perplexity" in skipped[0].find("skipped").get("message")
