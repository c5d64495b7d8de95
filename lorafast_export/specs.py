"""What targets and quantization methods are, as data: names, defaults and declared limits. No implementation.

This is the one source of truth for names: the recipe's schema, the CLI's choices, the target registry and the
quantizers all read them from here. The recipe checks a target's limits through these specs, so reading a recipe
imports no target code (targets/registry.py imports the implementation, lazily, when a build needs it).

A target declares, besides its name and the module that implements it (targets/<package>/target.py):
- `requires_symmetric`: its low-bit kernels take no zero points, so quantizers default to symmetric codes;
- `needs_tokenizer`: the artifact ships the tokenizer (its runtime's generation client reads it), so the base's
  tokenizer is checked when the inputs are opened;
- `recipe_rules`: RecipeRule(field, ok, fix) for limits that recipe fields alone show (e.g. a group size);
- `option_problems(options, dtype)`: its check of target.options and target.dtype, one message per problem;
- `recorded_paths`: (JSON file, key path) of every relative path it writes into model/, which `verify` and
  loading check stay inside the artifact.
A new target is a package under targets/ (its target.py registers it) plus its TargetSpec in TARGET_SPECS.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# ------------------------------------------------------------------------------------------------ dtypes

DTYPES = ("float32", "float16", "bfloat16")  # the floating dtypes a checkpoint or artifact may hold
MERGE_DTYPES = ("auto", *DTYPES)  # auto: keep the base's own dtype

# ----------------------------------------------------------------------------------------------- methods

QUANT_METHODS = ("rtn", "int8", "smoothquant", "gptq", "awq", "awq-gptq")  # implemented in quant/methods.py
QUANT_CHOICES = ("none", *QUANT_METHODS)
EIGHT_BIT = ("int8", "smoothquant")  # int8 codes: bits fixed at 8, per channel by default
# 8-bit methods: symmetric. 4-bit ones (gptq included since session 7: asymmetric g128 GPTQ is 5-6% lower KL on
# the 30M fixture, bench/QUANT.md): zero points, except on a target whose kernels take none (requires_symmetric)
SYMMETRIC_BY_DEFAULT = ("int8", "smoothquant")
# quant.range_search unset: searched for these methods at groups of RANGE_SEARCH_MIN_GROUP columns or more. On the
# 30M fixture (bench/QUANT.md) the search lowered GPTQ's KL 2-3% at g128 and raised it 2% at g64, 8% at g32.
RANGE_SEARCH_BY_DEFAULT = ("gptq", "awq-gptq")
RANGE_SEARCH_MIN_GROUP = 128
# GPTQ's walk (specs.default_true_sequential): true-sequential at groups of this many columns or more and per channel,
# one pass below. A decision of its own (CPU time at the default g128), not the range search's threshold.
TRUE_SEQUENTIAL_MIN_GROUP = 128
# quant.scale_refit unset: on for these methods (gptq.refit_scales; 30M fixture, session 10, bench/QUANT.md: gptq
# KL -3.0% at g128 and -3.3% at g32, asymmetric)
SCALE_REFIT_BY_DEFAULT = ("gptq", "awq-gptq")
HF_FORMATS = ("auto", "gptq", "awq", "compressed-tensors")  # checkpoint layouts of a quantized `hf` artifact


def default_settings(
    method: str, bits: int | None, group_size: int | None, symmetric: bool | None, requires_symmetric: bool
) -> dict[str, Any]:
    """bits, group_size, symmetric: the recipe's value, else the method's default (for a target whose kernels
    take no zero points, an unset symmetric means symmetric)."""
    if symmetric is None and requires_symmetric:
        symmetric = True
    bits = bits or (8 if method in EIGHT_BIT else 4)
    return {
        "bits": bits,
        "group_size": group_size if group_size is not None else (-1 if bits == 8 else 128),
        "symmetric": symmetric if symmetric is not None else method in SYMMETRIC_BY_DEFAULT,
    }


def default_true_sequential(method: str, group_size: int) -> bool:
    """GPTQ's walk within a layer, for gptq and awq-gptq alike: true-sequential (each linear group's Hessian from the
    block with the groups before it quantized) at groups of >= TRUE_SEQUENTIAL_MIN_GROUP columns and per channel, one
    pass (every Hessian from one forward of the unquantized block) below, where it measured lower KL (30M fixture, 45
    blocks: gptq g64 asym 0.001706 vs 0.001710, g32 asym 0.001382 vs 0.001409, g32 sym 0.001559 vs 0.001563;
    bench/QUANT.md). awq-gptq walked one pass everywhere until session 10; with the scale refit, true-sequential at
    g128 measured lower (asym 0.001987 vs 0.002009, sym 0.002051 vs 0.002083)."""
    return not 0 < group_size < TRUE_SEQUENTIAL_MIN_GROUP


# awq-gptq: how many of AWQ's best scales (with s = 1) GPTQ's own error chooses from, per group of linears. On the 30M
# fixture (bench/QUANT.md, session 12) 10 instead of 3 lowered the KL at g128 (asym -3.1%, 180 blocks -1.8%; sym
# -0.8%) and raised it at g32 (asym +2.0%, sym +1.2%), so 10 at whole groups of >= 128 columns, 3 below and per channel.
CHOICE_FINALISTS = 10
CHOICE_FINALISTS_SMALL_GROUPS = 3


def default_choice_finalists(group_size: int) -> int:
    """awq-gptq's candidate scales per group of linears (AWQ's best ones by its RTN loss, then GPTQ's error decides)."""
    return CHOICE_FINALISTS if group_size >= RANGE_SEARCH_MIN_GROUP else CHOICE_FINALISTS_SMALL_GROUPS


def default_range_search(method: str, group_size: int, range_search: bool | None) -> bool:
    """quant.range_search: the recipe's value, else on for gptq / awq-gptq at whole groups of >= 128 columns (not
    per channel: not measured)."""
    if range_search is not None:
        return range_search
    return method in RANGE_SEARCH_BY_DEFAULT and group_size >= RANGE_SEARCH_MIN_GROUP


def default_scale_refit(method: str) -> bool:
    """quant.scale_refit unset: on for gptq and awq-gptq (every group size and symmetry), off for the rest."""
    return method in SCALE_REFIT_BY_DEFAULT


# ----------------------------------------------------------------------------------------------- targets


@dataclass(frozen=True)
class RecipeRule:
    """One limit of a target that the recipe alone shows: `ok(value, values)` must hold for the resolved value of
    `field` (per-method defaults filled in; `values`: every resolved field, see resolved_fields), else `fix`."""

    field: str  # dotted recipe field, as the error names it, e.g. "quant.group_size"
    ok: Callable[[Any, dict[str, Any]], bool]
    fix: str  # why the target cannot, and what to use instead


@dataclass(frozen=True)
class TargetSpec:
    name: str
    module: str  # defines and registers the target (imported only when a build, doctor or verify needs it)
    requires_symmetric: bool = False
    needs_tokenizer: bool = False
    recipe_rules: tuple[RecipeRule, ...] = ()
    option_problems: Callable[[dict, str], list[str]] | None = None
    recorded_paths: tuple[tuple[str, tuple[str, ...]], ...] = ()


# onnxruntime ------------------------------------------------------------------------------------------
ORT_DTYPES = {"auto": "float32", "float32": "float32", "float16": "float16"}
ORT_OPTIONS = {
    "accuracy_level": "MatMulNBits accuracy_level 0-4 (0: exact, activations in the model dtype; 4: int8 "
    "activations, faster on CPU, not exact)",
    "max_length": "longest sequence (prompt + generated) the artifact supports; default max_position_embeddings",
    "fuse_qkv": "true (default): q/k/v as one linear feeding GroupQueryAttention packed (same codes, one kernel); "
    "false: three linears",
}


def ort_option_problems(options: dict, dtype: str) -> list[str]:
    """target.options and target.dtype problems (checked when the recipe is read, and again when lowering)."""
    problems = [
        f"target.options: unknown option {k!r} for target onnxruntime (options: "
        + "; ".join(f"{name}: {what}" for name, what in ORT_OPTIONS.items())
        + ")"
        for k in options
        if k not in ORT_OPTIONS
    ]
    level = options.get("accuracy_level", 0)
    if not isinstance(level, int) or isinstance(level, bool) or not 0 <= level <= 4:
        problems.append(f"target.options: accuracy_level={level!r}: use an integer 0-4")
    max_length = options.get("max_length", 1)  # absent: the model's max_position_embeddings
    if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 1:
        problems.append(f"target.options: max_length={max_length!r}: use a positive integer")
    if not isinstance(options.get("fuse_qkv", True), bool):
        problems.append(f"target.options: fuse_qkv={options['fuse_qkv']!r}: use true or false")
    if dtype not in ORT_DTYPES:
        problems.append(
            f"target.dtype: {dtype!r}: this target builds float32 or float16 graphs (the dtypes "
            "validated with onnxruntime's CPU GroupQueryAttention/MatMulNBits kernels); use auto, "
            "float32 or float16"
        )
    return problems


def _blocks_tile_groups(group_size: int, values: dict) -> bool:
    """MatMulNBits blocks are powers of two >= 16 and must tile each group (onnxruntime/nbits.py block_size_for)."""
    if values["quant.method"] in (
        "none",
        "smoothquant",
    ):  # unquantized, or MatMulInteger (onnxruntime/w8a8.py)
        return True
    return group_size == -1 or (group_size & -group_size) >= 16


def _w8a8(values: dict) -> bool:
    return values["quant.method"] == "smoothquant"


ORT_RULES = (
    RecipeRule(
        "quant.group_size",
        _blocks_tile_groups,
        "onnxruntime's MatMulNBits blocks are powers of two >= 16 that must tile each quantization group; "
        "use a group size that is a multiple of 16 (32, 64, 128) or -1 (per channel)",
    ),
    RecipeRule(
        "quant.group_size",
        lambda g, v: not _w8a8(v) or g == -1,
        "smoothquant (W8A8) lowers to MatMulInteger with per-channel int8 weights (onnxruntime/w8a8.py); "
        "use group_size -1",
    ),
    RecipeRule(
        "quant.symmetric",
        lambda sym, v: not _w8a8(v) or sym,
        "smoothquant (W8A8) lowers to MatMulInteger with symmetric int8 weights (no zero points); "
        "remove quant.symmetric: false",
    ),
)

# openvino ---------------------------------------------------------------------------------------------
OV_OPTIONS: dict[str, str] = {}  # option → what it does; the openvino target takes none yet


def ov_option_problems(options: dict, dtype: str) -> list[str]:
    problems = []
    unknown = sorted(set(options) - set(OV_OPTIONS))
    if unknown:
        problems.append(
            f"recipe target.options: unknown key(s) {', '.join(unknown)} for target 'openvino' "
            f"(known: {', '.join(OV_OPTIONS) or 'none'})."
        )
    if dtype not in ("auto", "float32"):
        problems.append(
            f"recipe target.dtype={dtype!r}: the openvino target stores unquantized tensors (embeddings, norms, "
            "unquantized linears) in f32, and the runtime picks its own compute precision. Use dtype 'auto', and "
            "a quant method (int8, rtn, gptq, awq) for a smaller artifact."
        )
    return problems


# trt-llm ----------------------------------------------------------------------------------------------
def _sq_needs_legacy(method: str, values: dict) -> bool:
    return method != "smoothquant" or bool((values.get("target.options") or {}).get("legacy"))


# The same refusal, with every other reason, is made again at lowering by trt_llm/scheme.py from the quantized model.
TRT_RULES = (
    RecipeRule(
        "quant.method",
        _sq_needs_legacy,
        "TensorRT-LLM's PyTorch backend has no INT8 W8A8 (SmoothQuant) linear (tensorrt_llm/_torch/modules/"
        "linear.py get_quant_method); add --trt-llm-legacy (target.options.legacy: true) for the TensorRT "
        "engine checkpoint, quant_algo W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN, or use quant.method int8 or awq",
    ),
)

TARGET_SPECS: dict[str, TargetSpec] = {
    s.name: s
    for s in (
        TargetSpec("hf", "lorafast_export.targets.hf.target"),
        TargetSpec("torch-compile", "lorafast_export.targets.torch_compile.target"),
        TargetSpec(
            "onnxruntime",
            "lorafast_export.targets.onnxruntime.target",
            needs_tokenizer=True,
            recipe_rules=ORT_RULES,
            option_problems=ort_option_problems,
            # onnxruntime-genai opens the decoder graph that genai_config.json names
            recorded_paths=(("genai_config.json", ("model", "decoder", "filename")),),
        ),
        TargetSpec(
            "openvino",
            "lorafast_export.targets.openvino.target",
            needs_tokenizer=True,
            option_problems=ov_option_problems,
        ),
        TargetSpec(
            "trt-llm",
            "lorafast_export.targets.trt_llm.target",
            requires_symmetric=True,
            recipe_rules=TRT_RULES,
        ),
    )
}
TARGET_NAMES = tuple(TARGET_SPECS)


def target_spec(name: str) -> TargetSpec | None:
    return TARGET_SPECS.get(name)


# ------------------------------------------------------------------------------------ checks from declarations


def resolved_fields(recipe, requires_symmetric: bool = False) -> dict[str, Any]:
    """Dotted recipe field → the value lowering will see (quant defaults of the method and target filled in)."""
    q = recipe.quant
    quant = q.model_dump() | default_settings(q.method, q.bits, q.group_size, q.symmetric, requires_symmetric)
    values = {f"quant.{k}": v for k, v in quant.items()}
    values |= {f"target.{k}": v for k, v in recipe.target.model_dump().items()}
    return values | {"merge.dtype": recipe.merge.dtype}


def recipe_problems(recipe) -> list[str]:
    """What the recipe's target cannot do, knowable from the recipe alone; each problem names its field + fix."""
    spec = TARGET_SPECS[recipe.target.name]
    values = resolved_fields(recipe, spec.requires_symmetric)
    problems = [
        f"{r.field}: {values[r.field]!r} is not possible with target {spec.name}: {r.fix}"
        for r in spec.recipe_rules
        if not r.ok(values[r.field], values)
    ]
    if spec.option_problems is not None:
        problems += spec.option_problems(dict(recipe.target.options or {}), recipe.target.dtype)
    return problems
