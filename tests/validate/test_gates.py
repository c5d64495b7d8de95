"""Gate grammar, errors that name the problem, and evaluation against a metric table."""

from __future__ import annotations

import math

import pytest

from lorafast_export.errors import InputError
from lorafast_export.validate.gates import (
    DEFAULT_GATES,
    GATE_METRICS,
    Gate,
    all_passed,
    evaluate_gates,
    parse_gate,
    parse_gates,
)

TABLE = {
    "quantized": {
        "prose": {"kl_mean": 0.03, "top1": 0.95, "adapter_gain_retained": 0.9},
        "code": {"kl_mean": 0.06, "top1": 0.91, "adapter_gain_retained": None},
    },
    "artifact": {
        "prose": {"kl_mean": 0.031, "top1": 0.95, "adapter_gain_retained": 0.88, "vs_previous.kl_mean": 1e-5},
        "code": {"kl_mean": 0.061, "top1": 0.9, "adapter_gain_retained": None, "vs_previous.kl_mean": 2e-5},
    },
}


@pytest.mark.parametrize(
    "expr, gate",
    [
        ("kl_mean<=0.02", Gate("kl_mean", "<=", 0.02)),
        ("top1>=0.98", Gate("top1", ">=", 0.98)),
        ("adapter_gain_retained>=0.9", Gate("adapter_gain_retained", ">=", 0.9)),
        ("prose.kl_p99<0.5", Gate("kl_p99", "<", 0.5, eval_set="prose")),
        ("stage:quantized.kl_mean<=0.05", Gate("kl_mean", "<=", 0.05, stage="quantized")),
        ("stage:merged-fp16.code.top1 > 0.999", Gate("top1", ">", 0.999, "merged-fp16", "code")),
        ("  kl_max == 0 ", Gate("kl_max", "==", 0.0)),
        ("stage:artifact.vs_previous.kl_mean<=1e-3", Gate("vs_previous.kl_mean", "<=", 1e-3, "artifact")),
        (
            "stage:artifact.code.vs_previous.top1>=0.999",
            Gate("vs_previous.top1", ">=", 0.999, "artifact", "code"),
        ),
    ],
)
def test_parse_valid(expr, gate):
    assert parse_gate(expr) == gate
    assert parse_gate(str(gate)) == gate  # the canonical text parses back to the same gate


@pytest.mark.parametrize(
    "expr, message",
    [
        ("kl_maen<=0.1", "unknown metric 'kl_maen' (did you mean 'kl_mean'?); valid metrics: kl_mean"),
        ("kl_mean 0.1", "no comparison operator"),
        ("kl_mean=0.1", "'=' is not an operator; use one of <, <=, >, >=, =="),
        ("kl_mean<==0.1", "'<==' is not an operator"),
        ("kl_mean=<0.1", "'=<' is not an operator"),
        ("kl_mean<=abc", "threshold 'abc' is not a number"),
        ("kl_mean<=nan", "must be a finite decimal number"),
        ("kl_mean<=", "threshold '' is not a number"),
        ("a.b.kl_mean<=0.1", "too many qualifiers 'a.b'"),
        ("stage:.kl_mean<=0.1", "stage '' must be a non-empty name"),
        ("stage:quantized<=0.1", "a metric must follow the stage"),
        ("pro se.kl_mean<=0.1", "eval set 'pro se' must be"),
    ],
)
def test_parse_invalid_names_the_problem(expr, message):
    with pytest.raises(InputError) as err:
        parse_gate(expr)
    assert message in str(err.value)
    assert repr(expr.strip()) in str(err.value) or repr(expr) in str(err.value)


def test_all_errors_reported_at_once():
    with pytest.raises(InputError) as err:
        parse_gates(["kl_maen<=1", "top1>=0.9", "top2>=0.9"])
    assert "kl_maen" in str(err.value) and "top2" in str(err.value)


def test_every_metric_is_gateable_and_defaults_parse():
    for metric in GATE_METRICS:
        assert parse_gate(f"{metric}<=1").metric == metric
    assert [g.metric for g in parse_gates(DEFAULT_GATES)] == ["kl_mean", "top1", "adapter_gain_retained"]


@pytest.mark.parametrize(
    "op, threshold, passed",
    [
        ("<", 0.031, False),
        ("<", 0.032, True),
        ("<=", 0.031, True),
        (">", 0.031, False),
        (">", 0.03, True),
        (">=", 0.031, True),
        ("==", 0.031, True),
        ("==", 0.0310001, False),
    ],
)
def test_every_operator(op, threshold, passed):
    [r] = evaluate_gates([f"prose.kl_mean{op}{threshold}"], TABLE)
    assert r.passed is passed
    assert (r.stage, r.eval_set, r.value, r.op, r.threshold) == ("artifact", "prose", 0.031, op, threshold)


def test_unqualified_gate_applies_to_final_stage_and_each_eval_set():
    results = evaluate_gates(["kl_mean<=0.05"], TABLE)
    assert [(r.expr, r.passed) for r in results] == [
        ("stage:artifact.prose.kl_mean<=0.05", True),
        ("stage:artifact.code.kl_mean<=0.05", False),
    ]
    assert not all_passed(results)
    assert [r.stage for r in evaluate_gates(["kl_mean<=0.05"], TABLE, final_stage="quantized")] == [
        "quantized"
    ] * 2


def test_undefined_adapter_gain_is_skipped_unless_strict():
    results = evaluate_gates(["adapter_gain_retained>=0.8"], TABLE)
    assert [r.passed for r in results] == [True, None]
    assert "did not change perplexity" in results[1].note
    assert all_passed(results)
    assert [r.passed for r in evaluate_gates(["adapter_gain_retained>=0.8"], TABLE, strict=True)] == [
        True,
        False,
    ]


def test_nan_fails():
    table = {"artifact": {"prose": {"kl_mean": math.nan}}}
    [r] = evaluate_gates(["kl_mean<=1"], table)
    assert r.passed is False and r.note == "value is NaN"
    [r] = evaluate_gates(["kl_mean>=0"], {"artifact": {"prose": {"kl_mean": math.inf}}})
    assert r.passed is True


def test_lookup_errors_list_what_exists():
    with pytest.raises(InputError, match="no stage 'quantised' in this run; stages: quantized, artifact"):
        evaluate_gates(["stage:quantised.kl_mean<=1"], TABLE)
    with pytest.raises(InputError, match="no eval set 'math' .* eval sets: prose, code"):
        evaluate_gates(["math.kl_mean<=1"], TABLE)
    with pytest.raises(InputError, match="'top1' was not computed"):
        evaluate_gates(["top1>=0.5"], {"artifact": {"prose": {"kl_mean": 0.1}}})
    with pytest.raises(InputError, match="no stage metrics"):
        evaluate_gates(["kl_mean<=1"], {})


def test_greedy_gate_says_when_the_greedy_check_was_skipped():
    """greedy_match is None when the check was skipped: the gate is skipped with the reason, never passed,
    and strict evaluation fails it."""
    table = {"artifact": {"prose": {"kl_mean": 0.1, "greedy_match": None}}}
    [r] = evaluate_gates(["greedy_match>=0.5"], table)
    assert r.passed is None and "greedy check was skipped" in r.note
    assert all_passed([r])  # skipped does not fail a run...
    [r] = evaluate_gates(["greedy_match>=0.5"], table, strict=True)
    assert r.passed is False and "greedy check was skipped" in r.note  # ...unless strict
