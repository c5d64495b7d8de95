"""Building the report: derived adapter gain, gate evaluation, attribution, input errors."""

from __future__ import annotations

import math

import pytest

from lorafast_export.errors import InputError
from lorafast_export.report.attribution import error_entry, stage_steps
from lorafast_export.report.json_report import parse_report, to_json
from lorafast_export.report.schema import (
    SCHEMA_ID,
    StageResult,
    build_report,
    metric_table,
    regate,
    stage_order,
    stage_result,
)
from lorafast_export.validate.gates import GATE_METRICS
from lorafast_export.validate.metrics import GREEDY_METRICS, TOKEN_METRICS


def test_stage_fields_cover_every_metric():
    fields = set(StageResult.model_fields)
    assert set(TOKEN_METRICS) - {"ppl_ref"} <= fields  # ppl_ref lives once per eval set
    assert set(GREEDY_METRICS) <= fields


def test_metric_table_offers_every_gate_metric(sample_report):
    table = metric_table(sample_report.stages, sample_report.adapter_gain_retained)
    row = table["artifact"]["prose"]
    assert set(GATE_METRICS) - {"ppl_ref"} <= set(row)


def test_sample_report_shape(sample_report):
    r = sample_report
    assert r.schema_ == SCHEMA_ID
    assert stage_order(r.stages) == ["merged-fp32", "merged-fp16", "quantized", "artifact"]
    assert [e.name for e in r.eval_sets] == ["prose", "code"]
    assert r.passed and all(g.passed for g in r.gates) and len(r.gates) == 6
    assert r.stages[0].vs_previous.against == "reference"
    assert r.stages[-1].vs_previous.against == "quantized"
    gain = r.adapter_gain_retained["artifact"]["prose"]
    assert 0.8 < gain < 1.0
    assert r.adapter_gain_retained["merged-fp32"]["prose"] == pytest.approx(1.0, abs=1e-6)


def test_error_enters_at_quantization(sample_report):
    steps = stage_steps(sample_report)
    assert [s.stage for s in steps] == ["merged-fp32", "merged-fp16", "quantized", "artifact"]
    assert error_entry(sample_report).stage == "quantized"
    assert steps[0].kl_step < 1e-10 < steps[1].kl_step < 1e-4 < steps[2].kl_step
    assert steps[3].kl_step < 1e-4  # lowering ~ float rounding


def test_failing_report(failing_report):
    assert not failing_report.passed
    assert all(g.passed is False for g in failing_report.gates)


def test_undefined_gain_is_skipped(sample_report):
    flat = [e.model_copy(update={"ppl_base": e.ppl_ref}) for e in sample_report.eval_sets]
    r = build_report(sample_report.artifact, flat, sample_report.stages)
    gains = [g for g in r.gates if g.metric == "adapter_gain_retained"]
    assert all(g.passed is None and g.value is None for g in gains)
    assert r.passed
    assert not build_report(sample_report.artifact, flat, sample_report.stages, strict=True).passed


def test_nan_survives_json_and_fails(sample_report):
    stages = list(sample_report.stages)
    stages[-1] = stages[-1].model_copy(update={"kl_mean": math.nan})
    r = build_report(sample_report.artifact, sample_report.eval_sets, stages)
    assert not r.passed
    text = to_json(r)
    assert '"kl_mean": "NaN"' in text
    back = parse_report(text)
    assert math.isnan(back.stages[-1].kl_mean)
    assert not regate(back, ["kl_mean<=1"]).passed


def test_regate(sample_report):
    strict = regate(sample_report, ["stage:quantized.kl_mean<=1e-6"])
    assert not strict.passed and [g.stage for g in strict.gates] == ["quantized", "quantized"]
    assert sample_report.passed  # the original is untouched


def test_build_errors_are_collected(sample_report):
    s = sample_report.stages[0]
    with pytest.raises(InputError) as err:
        build_report(
            sample_report.artifact, sample_report.eval_sets, [s, s, s.model_copy(update={"eval_set": "math"})]
        )
    assert "appears twice" in str(err.value) and "'math' is not in eval_sets" in str(err.value)
    with pytest.raises(InputError, match="at least one stage"):
        build_report(sample_report.artifact, sample_report.eval_sets, [])


def test_stage_result_needs_previous_name(sample_report):
    metrics = sample_report.stages[0].model_dump()
    with pytest.raises(InputError, match="'previous'"):
        stage_result("quantized", "prose", metrics, vs_previous=metrics)


def test_attribution_without_vs_previous(sample_report):
    from lorafast_export.report.diff import render_diff
    from lorafast_export.report.html import render_html
    from lorafast_export.report.junit import render_junit
    from lorafast_export.report.markdown import render_markdown

    bare = sample_report.model_copy(
        update={
            "stages": [
                s.model_copy(update={"vs_previous": None, "greedy_match": None}) for s in sample_report.stages
            ]
        }
    )
    steps = stage_steps(bare)
    assert steps[0].against == "reference" and steps[2].against == "merged-fp16"
    assert steps[2].kl_step == pytest.approx(steps[2].kl_vs_ref - steps[1].kl_vs_ref)
    assert error_entry(bare).stage == "quantized"
    for render in (render_html, render_markdown, render_junit):
        assert render(bare)
    assert render_diff(bare, sample_report)
