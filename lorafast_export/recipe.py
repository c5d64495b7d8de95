"""The Recipe: one typed, versioned description of a whole build. YAML in and out without loss.

Every section refuses unknown keys; all problems in a recipe are reported at once, each naming its field.
Names (targets, quant methods) are checked against our registries, never imported from arbitrary paths.
Paths are kept as written; relative paths resolve against the working directory at run time.
`demo:base`, `demo:lora` and `demo:dora` name the bundled demo model and adapters.

Paths and safety: inputs (base, adapters, calibration, eval, prompts) are only read and may be anywhere.
output.dir is the user's choice, but with force (which replaces it as a whole) never the working directory, the
home directory, one of their parents, or a directory holding an input. Every file a build writes lies inside
output.dir: validate.junit is a path relative to it (written with the artifact, published with it). A path
written into an artifact is relative and stays inside it (outside_reason).
The target's own limits that the recipe shows (e.g. a group size its kernels cannot run) are refused here too,
from what the target declares (specs.py: recipe_rules, option_problems).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lorafast_export.errors import InputError
from lorafast_export.paths import DEMO_DIR, TEXT_DIR, outside_reason, resolve_path
from lorafast_export.safeio import LIMITS, read_text
from lorafast_export.specs import (
    DTYPES,
    HF_FORMATS,
    MERGE_DTYPES,
    QUANT_CHOICES,
    TARGET_NAMES,
    recipe_problems,
)

RECIPE_VERSION = 1
ARTIFACT_NAMES = ("manifest.json", "model", "report.json", "report.md", "report.html")  # what a build writes
PSEUDO_FS = (Path("/proc"), Path("/sys"))  # where an output directory can never go
# names (targets, quant methods, dtypes) are the specs' (specs.py); path helpers live in paths.py
__all__ = ["DEMO_DIR", "TEXT_DIR", "Recipe", "format_errors", "outside_reason", "resolve_path"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class AdapterRef(_Section):
    path: str
    weight: float = 1.0
    # only for Lightning .ckpt adapters, when the checkpoint's hyperparameters lack them:
    lora_alpha: float | None = None
    use_rslora: bool | None = None

    @field_validator("weight")
    @classmethod
    def _finite_weight(cls, v):
        if not math.isfinite(v):
            raise ValueError(
                f"the adapter weight must be a finite number, got {v} (PATH:WEIGHT, e.g. ad:0.5)"
            )
        return v

    @field_validator("lora_alpha")
    @classmethod
    def _alpha(cls, v):
        if v is not None and not (math.isfinite(v) and v > 0):
            raise ValueError(f"lora_alpha must be a positive finite number, got {v}")
        return v

    def overrides(self) -> dict:
        return {"lora_alpha": self.lora_alpha, "use_rslora": self.use_rslora}


class Inputs(_Section):
    base: str = "demo:base"
    adapters: list[AdapterRef] = Field(default_factory=lambda: [AdapterRef(path="demo:lora")])
    allow_pickle: bool = False


class MergeOptions(_Section):
    dtype: Literal[MERGE_DTYPES] = "auto"


class CalibOptions(_Section):
    files: list[str] = Field(default_factory=list)  # empty: the bundled calibration text
    samples: int = Field(default=64, gt=0)
    seq_len: int = Field(default=256, gt=8)
    seed: int = 0


class QuantOptions(_Section):
    method: Literal[QUANT_CHOICES] = "none"
    # None: the method's default, filled in by quant.config.resolve_quant (4 bits, or 8 for int8/smoothquant;
    # group 128 at 4 bits, per channel at 8; symmetric for int8/smoothquant or a target that needs it, asymmetric otherwise)
    bits: int | None = None
    group_size: int | None = None
    symmetric: bool | None = None
    act_order: bool = False  # gptq: act-order with each group's params chosen as it starts: needs g_idx
    # gptq / awq-gptq without act_order: columns still in decreasing diag(H) order, but every group's params fixed
    # from the weights before the sweep (llm-compressor's actorder "static"), so the groups stay contiguous and
    # every target takes the codes (bench/QUANT.md: -8% KL at g128 on the 30M fixture). false: natural order.
    static_act_order: bool = True
    # gptq / awq-gptq: each group's range searched (diag(H)-weighted MSE grid) instead of min-max. None: the
    # method's default (specs.RANGE_SEARCH_BY_DEFAULT, filled in by quant.config.resolve_quant)
    range_search: bool | None = None
    # gptq / awq-gptq: after the sweep, each group's scale re-solved for the codes it got (least squares on the
    # calibration Hessian; codes and zero points unchanged). None: the method's default (on for both)
    scale_refit: bool | None = None
    damp_percent: float = Field(default=0.01, gt=0, lt=1)
    block_size: int = Field(default=128, gt=0)
    smooth_alpha: float = Field(default=0.5, ge=0, le=1)
    awq_grid: int = Field(default=20, gt=1)
    awq_clip: bool = True
    quantize_lm_head: bool = False
    calib: CalibOptions = Field(default_factory=CalibOptions)
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @field_validator("bits")
    @classmethod
    def _bits(cls, v):
        if v is not None and v not in (4, 8):
            raise ValueError("bits must be 4 or 8")
        return v

    @field_validator("group_size")
    @classmethod
    def _group(cls, v):
        if v is not None and v != -1 and (v < 8 or v & (v - 1)):
            raise ValueError("group_size must be -1 (per channel) or a power of two >= 8, e.g. 128")
        return v

    @model_validator(mode="after")
    def _method_settings(self):
        problems = []
        if self.method in ("int8", "smoothquant") and self.bits not in (None, 8):
            problems.append(f"quant.bits: {self.method} is 8-bit; remove bits or set it to 8")
        if (
            self.act_order and self.method != "gptq"
        ):  # (awq-gptq takes static_act_order only: no g_idx in AWQ)
            problems.append("quant.act_order: only gptq uses act_order; remove it or use method gptq")
        if self.range_search and self.method not in ("gptq", "awq-gptq"):
            problems.append(
                "quant.range_search: only gptq and awq-gptq search group ranges; remove it or use one of them"
            )
        if self.scale_refit and self.method not in ("gptq", "awq-gptq"):
            problems.append(
                "quant.scale_refit: only gptq and awq-gptq refit their scales; remove it or use one of them"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self


class TargetOptions(_Section):
    name: Literal[TARGET_NAMES] = "hf"
    hf_format: Literal[HF_FORMATS] = "auto"
    dtype: Literal[MERGE_DTYPES] = "auto"
    options: dict[str, Any] = Field(default_factory=dict)  # target-specific; each target checks its own keys


class EvalSet(_Section):
    name: str
    path: str


class ValidateOptions(_Section):
    enabled: bool = True
    eval: list[EvalSet] = Field(default_factory=list)  # empty: the bundled default eval sets
    max_tokens: int = Field(default=8192, gt=0)
    block_size: int = Field(default=256, gt=8)
    prompts: str | None = None  # jsonl with {"prompt": ...}; empty: bundled prompts
    max_new_tokens: int = Field(default=32, ge=1)
    gates: list[str] | None = None  # None: the default gates
    dtype: Literal[DTYPES] = "float32"  # the reference's dtype (fp16/bf16: GPU only)
    junit: str | None = (
        None  # JUnit XML (one test case per gate): a path inside the artifact, relative to output.dir
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"


class OutputOptions(_Section):
    dir: str = "dist/demo"
    force: bool = False
    cache: bool = True  # reuse finished stages from the content-addressed stage cache

    @property
    def path(self) -> Path:
        """Where the artifact goes: `dir` with `~` expanded, like every other path of a recipe."""
        return Path(self.dir).expanduser()


class Recipe(_Section):
    version: int = RECIPE_VERSION
    name: str = "demo"
    inputs: Inputs = Field(default_factory=Inputs)
    merge: MergeOptions = Field(default_factory=MergeOptions)
    quant: QuantOptions = Field(default_factory=QuantOptions)
    target: TargetOptions = Field(default_factory=TargetOptions)
    validate_: ValidateOptions = Field(default_factory=ValidateOptions, alias="validate")
    output: OutputOptions = Field(default_factory=OutputOptions)
    seed: int = 0

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, validate_default=True)

    @model_validator(mode="before")
    @classmethod
    def _base_given(cls, data):
        """The demo base is the default only for the demo adapters: an adapter of the user's without a base would
        be merged into the demo model (and fail with dozens of shape mismatches, or worse, fit by chance)."""
        inputs = data.get("inputs") if isinstance(data, dict) else None
        if not isinstance(inputs, dict) or inputs.get("base") is not None:
            return data
        own = [
            a.get("path") if isinstance(a, dict) else getattr(a, "path", a)
            for a in inputs.get("adapters") or []
        ]
        own = [p for p in own if not (isinstance(p, str) and p.startswith("demo:"))]
        if own:
            raise ValueError(
                f"inputs.base: the base model is required with your own adapter(s) ({', '.join(map(str, own))}): give "
                "the model they were trained on with --base DIR (or inputs.base in the recipe). The bundled "
                "demo base is only the default for the demo adapters (demo:lora, demo:dora)."
            )
        return data

    @field_validator("version")
    @classmethod
    def _version(cls, v):
        if v != RECIPE_VERSION:
            raise ValueError(f"this lorafast-export reads recipe version {RECIPE_VERSION}; got {v}")
        return v

    @model_validator(mode="after")
    def _cross(self):
        # the target's own limits, as its spec declares them (specs.py: no target code is imported)
        problems = [
            *self._conflicts(),
            *self._output_dir_problems(),
            *self._output_location_problems(),
            *self._written_path_problems(),
            *recipe_problems(self),
        ]
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def _conflicts(self) -> list[str]:
        problems = []
        if not self.inputs.adapters:
            problems.append(
                "inputs.adapters: at least one adapter is required (use `merge` flags or add one)"
            )
        if self.target.hf_format != "auto" and self.quant.method == "none":
            problems.append("target.hf_format: a checkpoint format needs a quant method; set quant.method")
        if self.validate_.dtype != "float32" and self.validate_.device == "cpu":
            problems.append("validate.dtype: a half-precision reference is for GPUs; use float32 on cpu")
        if self.target.hf_format in ("gptq", "awq") and self.quant.method in ("int8", "smoothquant"):
            problems.append(
                f"target.hf_format: {self.target.hf_format} holds 4-bit weight-only codes; "
                f"use compressed-tensors for {self.quant.method}"
            )
        return problems

    def read_paths(self) -> list[tuple[str, str]]:
        """(field, path) of every file or directory the build only reads."""
        v = self.validate_
        return [
            ("inputs.base", self.inputs.base),
            *((f"inputs.adapters[{i}].path", a.path) for i, a in enumerate(self.inputs.adapters)),
            *((f"quant.calib.files[{i}]", f) for i, f in enumerate(self.quant.calib.files)),
            *((f"validate.eval[{i}].path", e.path) for i, e in enumerate(v.eval)),
            *([("validate.prompts", v.prompts)] if v.prompts else []),
        ]

    def _output_dir_problems(self) -> list[str]:
        """With force, output.dir is replaced as a whole: it must not hold the working directory, home or an input.
        (Without force an existing output.dir is refused before any work, and a new one holds nothing yet.)"""
        if not self.output.force:
            return []
        out = self.output.path.resolve()
        held = [
            f"{what} {d}"
            for what, d in (("the working directory", Path.cwd()), ("your home directory", _home()))
            if d is not None and d.resolve().is_relative_to(out)
        ]
        held += [
            f"the input {field} {p!r}"
            for field, p in self.read_paths()
            if resolve_path(p).resolve().is_relative_to(out)
        ]
        if not held:
            return []
        return [
            f"output.dir: {self.output.dir!r} is or holds {', '.join(held)}; with force (--force) the build "
            "would replace it as a whole. Choose a new directory for the artifact, e.g. dist/<name>."
        ]

    def _output_location_problems(self) -> list[str]:
        """Kernel pseudo file systems take no artifacts: writes there fail in odd ways (ENOENT, EPERM) or worse."""
        out = self.output.path.resolve()
        hit = next((d for d in PSEUDO_FS if out.is_relative_to(d)), None)
        if hit is None:
            return []
        return [
            f"output.dir: {self.output.dir!r} is under {hit}, a kernel pseudo file system where no files can be "
            "written; choose a directory on a disk, e.g. dist/<name>."
        ]

    def _written_path_problems(self) -> list[str]:
        """Files a recipe names for writing (validate.junit) lie inside the artifact, beside what the build writes."""
        junit = self.validate_.junit
        if junit is None:
            return []
        out = self.output.path
        why = outside_reason(out, junit)
        if why is None and Path(junit).parts[0] in ARTIFACT_NAMES:
            why = f"is a name the build writes itself ({', '.join(ARTIFACT_NAMES)})"
        if why is None:
            return []
        return [
            f"validate.junit: {junit!r} {why}. The JUnit file is written inside the artifact: give a path "
            f"relative to output.dir ({self.output.dir}), e.g. junit.xml or reports/junit.xml."
        ]

    # ------------------------------------------------------------------ YAML
    def to_dict(self) -> dict:
        return self.model_dump(mode="json", by_alias=True)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @staticmethod
    def from_dict(d: dict, source: str = "recipe") -> Recipe:
        try:
            return Recipe.model_validate(d)
        except ValidationError as e:
            raise InputError(format_errors(e, source)) from None

    @staticmethod
    def from_yaml(path: str | Path) -> Recipe:
        return Recipe.from_dict(_read_yaml(Path(path)), str(path))

    @staticmethod
    def load(path: str | Path | None, overrides: dict[str, Any]) -> Recipe:
        """A recipe file (or none: the defaults) with dotted-key overrides (the command line's flags) applied to
        what the file says, before defaults are filled in: a field neither gives keeps its default."""
        data = _read_yaml(Path(path)) if path is not None else {}
        return Recipe.from_dict(_apply(data, overrides), str(path or "command line"))

    def with_overrides(self, overrides: dict[str, Any]) -> Recipe:
        """Apply dotted-key overrides (e.g. {"quant.method": "awq"}) and re-validate everything at once."""
        return Recipe.from_dict(_apply(self.to_dict(), overrides), "command line / recipe")


def _apply(d: dict, overrides: dict[str, Any]) -> dict:
    for key, value in overrides.items():
        node = d
        *parents, leaf = key.split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[leaf] = value
    return d


def _read_yaml(p: Path) -> dict:
    text = read_text(p, "recipe file", LIMITS["recipe"])
    try:
        data = yaml.load(text, Loader=StrictLoader)  # noqa: S506 - a SafeLoader without aliases
    except yaml.YAMLError as e:
        raise InputError(f"{p}: not valid YAML ({e}).") from None
    if not isinstance(data, dict):
        raise InputError(
            f"{p}: a recipe is a YAML mapping with sections inputs/merge/quant/target/validate/output."
        )
    return data


class StrictLoader(yaml.SafeLoader):
    """safe_load without anchors/aliases (a few nested aliases expand into billions of nodes: "billion
    laughs"), without duplicate keys (a second `quant:` would silently replace the first), and nested at most
    MAX_DEPTH deep (PyYAML composes recursively: 20,000 `[` would end in a RecursionError)."""

    MAX_DEPTH = 32
    _depth = 0

    def compose_node(self, parent, index):
        if self._depth >= self.MAX_DEPTH:
            raise yaml.constructor.ConstructorError(
                None, None, f"nested more than {self.MAX_DEPTH} levels deep", self.peek_event().start_mark
            )
        self._depth += 1
        try:
            return self._compose_node(parent, index)
        finally:
            self._depth -= 1

    def _compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent) or getattr(self.peek_event(), "anchor", None):
            event = self.peek_event()
            raise yaml.constructor.ConstructorError(
                None,
                None,
                "anchors and aliases (&name, *name) are not allowed in a recipe; write the values out",
                event.start_mark,
            )
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, (str, int, float, bool, type(None))):
                continue  # unhashable keys: SafeLoader's own error names them
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}: each key may appear once", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _home() -> Path | None:
    try:
        home = Path.home()
    except RuntimeError:  # no HOME and no passwd entry: nothing to protect there
        return None
    return home if home.is_absolute() else None


def format_errors(e: ValidationError, source: str) -> str:
    lines = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"] if not str(x).startswith("function-after"))
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key; remove it or check its spelling (see `lorafast-export build --dump-recipe`)"
        elif err["type"] == "literal_error":
            msg = msg.replace("Input should be", "must be one of:")
        # whole-recipe checks report one problem per line, each starting with its own field
        lines += [f"  - {loc}: {m}" if loc else f"  - {m}" for m in msg.split("\n")]
    return f"{source}: {len(lines)} problem(s):\n" + "\n".join(lines)
