"""Matrix builds: every combination of a few recipe axes, each into its own artifact, one summary table.

Combinations share what they can through content-addressed caches: the reference logits (validate/reference),
the merged checkpoint and quantized forms (stagecache), so N targets x M methods merge once and quantize M times.
"""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

from lorafast_export.errors import InputError, LorafastError
from lorafast_export.recipe import Recipe
from lorafast_export.report.files import write_inside
from lorafast_export.safeio import LIMITS, read_text

# matrix axis → recipe field (the same names as the build flags)
AXES = {
    "target": "target.name",
    "quant": "quant.method",
    "bits": "quant.bits",
    "group_size": "quant.group_size",
    "dtype": "merge.dtype",
    "hf_format": "target.hf_format",
}
INT_AXES = ("bits", "group_size")
# values name the artifact directories <out>/<v1>-<v2>-...: one plain path component each, never '.' or '..'
VALUE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*|-[0-9]+")


def parse_axes(specs: list[str]) -> dict[str, list[str]]:
    axes: dict[str, list[str]] = {}
    for spec in specs:
        key, sep, values = spec.partition("=")
        if not sep or not values:
            raise InputError(f"--matrix {spec!r}: expected KEY=V1,V2 (keys: {', '.join(AXES)}).")
        if key not in AXES:
            raise InputError(f"--matrix {spec!r}: unknown axis {key!r}; axes: {', '.join(AXES)}.")
        if key in axes:
            raise InputError(
                f"--matrix {spec!r}: axis {key!r} is given twice; list all its values once: {key}=A,B."
            )
        axes[key] = [v for v in values.split(",") if v]
        bad = [v for v in axes[key] if not VALUE.fullmatch(v) or (key in INT_AXES and not _is_int(v))]
        if bad:
            kind = "integers" if key in INT_AXES else "plain names (letters, digits, '_', '.', '-')"
            raise InputError(
                f"--matrix {spec!r}: {', '.join(map(repr, bad))}: {key} values are {kind}; they also "
                "name the artifact directories under --out."
            )
        _refuse_repeats(spec, key, axes[key])
    if not axes:
        raise InputError(
            "--matrix needs at least one axis, e.g. --matrix target=onnxruntime,openvino quant=int8,awq"
        )
    return axes


def _refuse_repeats(spec: str, key: str, values: list[str]) -> None:
    """quant=none,none (or bits=4,04) would build one artifact twice, the second into the first's directory."""
    typed = [_typed(key, v) for v in values]
    for i, t in enumerate(typed):
        first, v = values[typed.index(t)], values[i]
        if typed.index(t) != i:
            twice = repr(v) if first == v else f"{first!r} and {v!r} (the same value)"
            raise InputError(f"--matrix {spec!r}: {twice} given twice; list each value once.")


def _is_int(v: str) -> bool:
    try:
        int(v)
    except ValueError:
        return False
    return True


def _typed(key: str, v: str):
    return int(v) if key in INT_AXES else v


def combinations(recipe: Recipe, axes: dict[str, list[str]]) -> list[tuple[str, Recipe]]:
    """All combinations, each a full recipe (validated up front: every bad combination reported at once)."""
    names = ["-".join(values) for values in itertools.product(*axes.values())]
    clash = sorted({n for n in names if names.count(n) > 1})
    if clash:  # values holding '-' can join into the same name: a-b + c and a + b-c
        raise InputError(
            f"matrix: combinations would share the artifact directory {', '.join(clash)} under --out."
        )
    root = recipe.output.path
    out, problems = [], []
    for values in itertools.product(*axes.values()):
        combo = dict(zip(axes, values, strict=True))
        name = "-".join(values)
        ov = {AXES[k]: _typed(k, v) for k, v in combo.items()}
        # validate.junit is relative to output.dir: each artifact gets its own JUnit file, <out>/<name>/<junit>
        ov |= {"output.dir": str(root / name), "name": f"{recipe.name}-{name}"}
        try:
            out.append((name, recipe.with_overrides(ov)))
        except InputError as e:
            problems.append(f"{name}: {e}")
    if problems:
        raise InputError("matrix: some combinations are invalid:\n" + "\n".join(problems))
    names = [name for name, _ in out]
    clash = sorted({n for n in names if names.count(n) > 1})
    if clash:  # values holding '-' can join into the same name: a-b + c and a + b-c
        raise InputError(
            f"matrix: combinations would share the artifact directory {', '.join(clash)} under --out."
        )
    return out


def run_matrix(recipe: Recipe, axes: dict[str, list[str]], progress=lambda s, m: None) -> dict:
    from lorafast_export.pipeline import run_build

    combos = combinations(recipe, axes)
    _check_summaries(recipe.output.path, recipe.output.force)
    rows = []
    for name, r in combos:
        progress("matrix", name)
        row = {"name": name, "artifact": r.output.dir, "target": r.target.name, "quant": r.quant.method}
        try:
            built = run_build(r, progress)
            row |= {
                "passed": None if built.report is None else built.report["passed"],
                "gates": [] if built.report is None else built.report["gates"],
                "metrics": None if built.report is None else built.report["summary"],
                "timings_s": built.timings,
            }
        except LorafastError as e:
            row |= {"passed": False, "error": str(e)}
        rows.append(row)
    summary = {
        "schema": SUMMARY_SCHEMA,
        "axes": axes,
        "artifacts": rows,
        "passed": all(r["passed"] is not False for r in rows),
    }
    root = recipe.output.path
    root.mkdir(parents=True, exist_ok=True)
    write_inside(
        root,
        {
            "summary.json": json.dumps(summary, indent=2, default=str) + "\n",
            "summary.md": render_summary(summary),
        },
    )
    return summary


SUMMARY_SCHEMA = "lorafast-export/matrix/v1"


def _check_summaries(root: Path, force: bool) -> None:
    """summary.json/.md are written into --out beside the artifacts: never over a file of the user's."""
    existing = [
        root / n for n in ("summary.json", "summary.md") if (root / n).exists() or (root / n).is_symlink()
    ]
    if not existing:
        return
    if not force:
        raise InputError(
            f"{existing[0]}: already exists. Pass --force to replace the matrix's artifacts and summary, or "
            "choose another --out."
        )
    try:
        ours = json.loads(read_text(root / "summary.json", "matrix summary", LIMITS["report"]))["schema"]
    except (InputError, json.JSONDecodeError, KeyError, TypeError):
        ours = None
    if ours != SUMMARY_SCHEMA:
        raise InputError(
            f"{root}: holds summary.json/summary.md that are not a lorafast-export matrix summary; --force "
            "replaces only ours. Choose another --out, or remove them yourself."
        )


def _fmt(x) -> str:
    return "—" if x is None else f"{x:.3g}" if isinstance(x, float) else str(x)


def render_summary(summary: dict) -> str:
    lines = [
        "## lorafast-export matrix",
        "",
        "| artifact | target | quant | gates | KL mean (per eval set) | top-1 | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in summary["artifacts"]:
        mark = {True: "✅ pass", False: "❌ fail", None: "— (not validated)"}[r["passed"]]
        m = r.get("metrics") or {}
        kl = ", ".join(f"{k} {_fmt(v['kl_mean'])}" for k, v in m.items())
        top1 = ", ".join(f"{k} {_fmt(v['top1'])}" for k, v in m.items())
        failed = [g["expr"] for g in r.get("gates", []) if g["passed"] is False]
        note = (
            r.get("error", "").splitlines()[0]
            if r.get("error")
            else ("failed: " + "; ".join(failed) if failed else "")
        )
        lines.append(f"| `{r['name']}` | {r['target']} | {r['quant']} | {mark} | {kl} | {top1} | {note} |")
    verdict = "all artifacts passed" if summary["passed"] else "some artifacts FAILED"
    return "\n".join([*lines, "", f"**{verdict}**", ""])
