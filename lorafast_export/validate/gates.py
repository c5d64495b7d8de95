"""Gates: thresholds on validation metrics that turn a report into pass/fail for CI.

Grammar (whitespace around the operator is allowed; names are [A-Za-z0-9_-]+):

    gate      := [ "stage:" STAGE "." ] [ EVAL_SET "." ] metric OP NUMBER
    metric    := [ "vs_previous." ] NAME          e.g. kl_mean, top1, vs_previous.kl_p99
    OP        := "<=" | ">=" | "==" | "<" | ">"
    NUMBER    := a finite decimal float (0.05, 1e-3, 90e-2)

    kl_mean<=0.02                      every eval set, final stage
    prose.kl_p99<0.5                   eval set "prose", final stage
    stage:quantized.kl_mean<=0.05      every eval set, stage "quantized"
    stage:artifact.code.vs_previous.kl_mean<=1e-3   lowering error only, eval set "code"

Without a stage the gate applies to the final stage (the artifact); without an eval set it applies to each
eval set separately (one result per eval set). "==" compares with a relative tolerance of 1e-9.
A NaN value fails its gate. `adapter_gain_retained` is undefined (None) when the adapter did not move
perplexity on an eval set: such a gate is reported as skipped (passed=None) unless `strict=True`.
"""

from __future__ import annotations

import difflib
import inspect
import math
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from lorafast_export.errors import InputError
from lorafast_export.targets.registry import get_target
from lorafast_export.validate.data import DEFAULT_EVAL
from lorafast_export.validate.metrics import COMPARISON_METRICS, GREEDY_METRICS, TOKEN_METRICS

# The default gates for the final artifact, as data: one place to read and change them.
#  - kl_mean <= 0.05 nats/token: good 8-bit builds sit near 1e-3 and good 4-bit group-wise builds
#    (RTN/GPTQ/AWQ, group 128) typically at 0.01-0.05 vs FP16; a broken build (wrong scales or zero
#    points, a mis-lowered op, a dropped adapter) is usually 0.1 and above.
#  - top1 >= 0.90: healthy 4-bit builds keep the same argmax for roughly 92-97% of tokens; below 90%
#    greedy outputs visibly change.
#  - adapter_gain_retained >= 0.80: the point of the export is the fine-tune. Losing more than a fifth of the
#    adapter's perplexity gain means the quantizer is erasing it (LoRA deltas are small next to W and can
#    fall below the quantization step); a dropped adapter scores ~0.
DEFAULT_GATES: tuple[str, ...] = ("kl_mean<=0.05", "top1>=0.90", "adapter_gain_retained>=0.80")

GATE_METRICS: tuple[str, ...] = (
    TOKEN_METRICS
    + GREEDY_METRICS
    + ("adapter_gain_retained",)
    + tuple(f"vs_previous.{m}" for m in COMPARISON_METRICS)
)
# Metrics that are legitimately undefined for some runs (value None): gates on them are skipped, not failed (failed
# with strict=True), and the gate's note says why. The greedy metrics are None when the greedy check was skipped
# (validate/greedy.py: no device could hold the model for decoding).
UNDEFINED_REASONS: dict[str, str] = {
    "adapter_gain_retained": "undefined: the adapter did not change perplexity on this eval set",
    **dict.fromkeys(
        GREEDY_METRICS, "not measured: the greedy check was skipped (the report's note says why)"
    ),
}
MAY_BE_UNDEFINED: frozenset[str] = frozenset(UNDEFINED_REASONS)

_OPS: dict[str, Callable[[float, float], bool]] = {
    "<=": operator.le,
    ">=": operator.ge,
    "==": lambda a, b: math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12),
    "<": operator.lt,
    ">": operator.gt,
}
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")

# stage -> eval set -> metric -> value (None = not defined for this run)
MetricTable = Mapping[str, Mapping[str, Mapping[str, float | None]]]


@dataclass(frozen=True)
class Gate:
    metric: str
    op: str
    threshold: float
    stage: str | None = None
    eval_set: str | None = None

    def qualified(self, stage: str | None = None, eval_set: str | None = None) -> str:
        """Canonical text; stage/eval_set fill in what the gate left open."""
        stage, eval_set = self.stage or stage, self.eval_set or eval_set
        prefix = (f"stage:{stage}." if stage else "") + (f"{eval_set}." if eval_set else "")
        return f"{prefix}{self.metric}{self.op}{self.threshold!r}"

    def __str__(self) -> str:
        return self.qualified()


@dataclass(frozen=True)
class GateResult:
    expr: str  # fully qualified: stage:<stage>.<eval_set>.<metric><op><threshold>
    gate: str  # the gate as written
    stage: str
    eval_set: str
    metric: str
    op: str
    threshold: float
    value: float | None
    passed: bool | None  # None: skipped, the metric is undefined for this run (see MAY_BE_UNDEFINED)
    note: str = ""


# ----------------------------------------------------------------------------- parsing


def _split_operator(text: str) -> tuple[str, str, str]:
    """'a.b<=0.1' -> ('a.b', '<=', '0.1'): the first run of '<', '>', '=' characters is the operator."""
    start = next((i for i, ch in enumerate(text) if ch in "<>="), None)
    if start is None:
        raise InputError(
            f"gate {text!r}: no comparison operator; write e.g. 'kl_mean<=0.05' (operators: <, <=, >, >=, ==)"
        )
    end = start
    while end < len(text) and text[end] in "<>=":
        end += 1
    op = text[start:end]
    if op not in _OPS:
        raise InputError(f"gate {text!r}: {op!r} is not an operator; use one of <, <=, >, >=, ==")
    return text[:start].strip(), op, text[end:].strip()


def _parse_number(expr: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise InputError(
            f"gate {expr!r}: threshold {text!r} is not a number; write e.g. 0.05 or 1e-3"
        ) from None
    if not math.isfinite(value) or "_" in text:
        raise InputError(f"gate {expr!r}: threshold {text!r} must be a finite decimal number")
    return value


def _check_name(expr: str, kind: str, name: str) -> str:
    if not name or not set(name) <= _NAME_CHARS:
        raise InputError(
            f"gate {expr!r}: {kind} {name!r} must be a non-empty name of letters, digits, '_' or '-'"
        )
    return name


def _check_metric(expr: str, metric: str) -> str:
    if metric in GATE_METRICS:
        return metric
    close = difflib.get_close_matches(metric, GATE_METRICS, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise InputError(
        f"gate {expr!r}: unknown metric {metric!r}{hint}; valid metrics: {', '.join(GATE_METRICS)}"
    )


def parse_gate(expr: str) -> Gate:
    """Parse one gate expression (grammar in the module docstring); raises InputError naming the problem."""
    lhs, op, rhs = _split_operator(expr.strip())
    threshold = _parse_number(expr, rhs)
    stage = None
    if lhs.startswith("stage:"):
        stage, dot, lhs = lhs[len("stage:") :].partition(".")
        _check_name(expr, "stage", stage)
        if not dot:
            raise InputError(
                f"gate {expr!r}: a metric must follow the stage, e.g. 'stage:{stage}.kl_mean<=0.05'"
            )
    parts = lhs.split(".")
    n_metric = 2 if len(parts) >= 2 and parts[-2] == "vs_previous" else 1
    metric, qualifiers = ".".join(parts[-n_metric:]), parts[:-n_metric]
    if len(qualifiers) > 1:
        raise InputError(
            f"gate {expr!r}: too many qualifiers {'.'.join(qualifiers)!r}; "
            "write [stage:<stage>.][<eval_set>.]<metric><op><number>"
        )
    eval_set = _check_name(expr, "eval set", qualifiers[0]) if qualifiers else None
    return Gate(_check_metric(expr, metric), op, threshold, stage, eval_set)


def parse_gates(exprs: Sequence[str | Gate]) -> list[Gate]:
    """Parse all gates, reporting every bad one at once."""
    gates, errors = [], []
    for expr in exprs:
        try:
            gates.append(expr if isinstance(expr, Gate) else parse_gate(expr))
        except InputError as err:
            errors.append(str(err))
    if errors:
        raise InputError("\n".join(errors))
    return gates


# ----------------------------------------------------------------------------- early checks (recipe read)


def possible_stages(recipe, revalidate: bool = False) -> list[str]:
    """The stage names validation can report for this recipe, known before anything runs. Mirrors
    validate/run.py: build_candidates (a build) and validate_artifact (a re-validation: merged-fp32, artifact).
    `merged-fp16`/`merged-bf16` exist only when the merged checkpoint has that dtype: with dtype auto either may."""
    if revalidate:
        return ["merged-fp32", "artifact"]
    merged = {"auto": ["merged-fp16", "merged-bf16"], "float16": ["merged-fp16"], "bfloat16": ["merged-bf16"]}
    quantized = ["quantized"] if recipe.quant.method != "none" else []
    load_params = inspect.signature(get_target(recipe.target.name).load).parameters
    runtime_default = ["artifact-runtime-default"] if "precision" in load_params else []
    return ["merged-fp32", *merged.get(recipe.merge.dtype, []), *quantized, "artifact", *runtime_default]


def recipe_gate_problems(recipe, revalidate: bool = False) -> list[str]:
    """Every problem of validate.gates, found when the recipe is read (also when validation is off): grammar,
    metric names, and stages or eval sets this build will not have."""
    gates = recipe.validate_.gates
    if not gates:
        return []
    stages = possible_stages(recipe, revalidate)
    eval_sets = [e.name for e in recipe.validate_.eval] or list(DEFAULT_EVAL)
    problems = []
    for expr in gates:
        try:
            gate = parse_gate(expr)
        except InputError as err:
            problems.append(str(err))
            continue
        if gate.stage is not None and gate.stage not in stages:
            problems.append(
                f"gate {expr!r}: this build has no stage {gate.stage!r}; its stages: {', '.join(stages)}"
            )
        if gate.eval_set is not None and gate.eval_set not in eval_sets:
            problems.append(
                f"gate {expr!r}: no eval set {gate.eval_set!r}; eval sets: {', '.join(eval_sets)} "
                "(add one with --eval NAME=FILE)"
            )
    return problems


def check_recipe_gates(recipe, revalidate: bool = False) -> None:
    problems = recipe_gate_problems(recipe, revalidate)
    if problems:
        raise InputError(f"validate.gates: {len(problems)} problem(s):\n  - " + "\n  - ".join(problems))


# ----------------------------------------------------------------------------- evaluation


def check_value(value: float | None, op: str, threshold: float) -> bool:
    """True when `value op threshold` holds; NaN never passes."""
    return value is not None and not math.isnan(value) and _OPS[op](value, threshold)


def _judge(gate: Gate, value: float | None, strict: bool) -> tuple[bool | None, str]:
    if value is None:
        return (False if strict else None), UNDEFINED_REASONS[gate.metric]
    if math.isnan(value):
        return False, "value is NaN"
    return check_value(value, gate.op, gate.threshold), ""


def _scopes(gate: Gate, table: MetricTable, final_stage: str) -> list[tuple[str, str]]:
    stage = gate.stage or final_stage
    if stage not in table:
        raise InputError(f"gate {str(gate)!r}: no stage {stage!r} in this run; stages: {', '.join(table)}")
    if gate.eval_set is None:
        return [(stage, es) for es in table[stage]]
    if gate.eval_set not in table[stage]:
        raise InputError(
            f"gate {str(gate)!r}: no eval set {gate.eval_set!r} for stage {stage!r}; "
            f"eval sets: {', '.join(table[stage])}"
        )
    return [(stage, gate.eval_set)]


def _lookup(gate: Gate, table: MetricTable, stage: str, eval_set: str) -> float | None:
    metrics = table[stage][eval_set]
    value = metrics.get(gate.metric)
    if value is None and gate.metric not in MAY_BE_UNDEFINED:
        raise InputError(
            f"gate {str(gate)!r}: metric {gate.metric!r} was not computed for stage {stage!r}, eval set "
            f"{eval_set!r}; enable it in the validation settings or remove the gate"
        )
    return value


def evaluate_gates(
    gates: Sequence[str | Gate],
    metrics_lookup: MetricTable,
    final_stage: str | None = None,
    strict: bool = False,
) -> list[GateResult]:
    """One GateResult per (gate, eval set). `final_stage` defaults to the last stage of `metrics_lookup`."""
    parsed = parse_gates(gates)
    if not metrics_lookup:
        raise InputError("gates: there are no stage metrics to check the gates against")
    final = final_stage or list(metrics_lookup)[-1]
    results, errors = [], []
    for gate in parsed:
        try:
            for stage, eval_set in _scopes(gate, metrics_lookup, final):
                value = _lookup(gate, metrics_lookup, stage, eval_set)
                passed, note = _judge(gate, value, strict)
                results.append(
                    GateResult(
                        gate.qualified(stage, eval_set),
                        str(gate),
                        stage,
                        eval_set,
                        gate.metric,
                        gate.op,
                        gate.threshold,
                        value,
                        passed,
                        note,
                    )
                )
        except InputError as err:
            errors.append(str(err))
    if errors:
        raise InputError("\n".join(errors))
    return results


def all_passed(results: Sequence[GateResult]) -> bool:
    """A run passes when no gate failed (skipped gates do not fail it; evaluate with strict=True for that)."""
    return all(r.passed is not False for r in results)
