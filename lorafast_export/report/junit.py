"""JUnit XML: one testcase per gate result, so CI systems show gates as tests."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from lorafast_export.report import fmt
from lorafast_export.report.schema import Report
from lorafast_export.validate.gates import GateResult


def _testcase(suite: ET.Element, artifact: str, g: GateResult) -> None:
    case = ET.SubElement(
        suite,
        "testcase",
        classname=f"lorafast-export.{artifact}.{g.stage}.{g.eval_set}",
        name=g.expr,
        time="0",
    )
    detail = (
        f"{g.metric} = {fmt.num(g.value, 6)}, required {g.op} {g.threshold!r} "
        f"(stage {g.stage}, eval set {g.eval_set})"
    )
    if g.passed is False:
        failure = ET.SubElement(case, "failure", message=detail, type="GateFailed")
        failure.text = detail + (f"; {g.note}" if g.note else "")
    elif g.passed is None:
        ET.SubElement(case, "skipped", message=f"{detail}: {g.note}")
    else:
        ET.SubElement(case, "system-out").text = detail


def render_junit(report: Report) -> str:
    gates = report.gates
    suites = ET.Element("testsuites", name="lorafast-export")
    suite = ET.SubElement(
        suites,
        "testsuite",
        name=f"lorafast-export gates: {report.artifact.name}",
        tests=str(len(gates)),
        failures=str(sum(g.passed is False for g in gates)),
        errors="0",
        skipped=str(sum(g.passed is None for g in gates)),
        time="0",
    )
    props = ET.SubElement(suite, "properties")
    for key, value in (("target", report.artifact.target), ("quant", report.artifact.quant)):
        ET.SubElement(props, "property", name=key, value=value)
    for g in gates:
        _testcase(suite, report.artifact.name, g)
    ET.indent(suites)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(suites, encoding="unicode") + "\n"
