"""Per-method quantization settings: one frozen class per method, selected by `method`.

The recipe's `quant` section (recipe.QuantOptions) is flat and user-facing; `resolve_quant` turns it into the
config of its method with every default filled in, in one place: the per-method defaults (bits, group size,
symmetry: specs.default_settings, which the recipe's target checks read too) and the target's rule (a target whose kernels take no zero points gets symmetric codes unless the
recipe says otherwise), and quant.range_search's default (specs.default_range_search: by method and group size). Quantizers
take these typed configs, never a string-keyed dict.

`record()` is what an artifact records about its quantization (manifest facts, the quantized form's settings,
torch-compile's artifact.json, OpenVINO's rt_info): the recipe's quant section, resolved. Its layout is fixed
(artifacts written before these classes existed hold the same keys), so it lists every recipe field, including
those another method uses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from lorafast_export.recipe import CalibOptions, QuantOptions
from lorafast_export.specs import (
    default_choice_finalists,
    default_range_search,
    default_scale_refit,
    default_settings,
    default_true_sequential,
)


@dataclass(frozen=True, kw_only=True)
class QuantConfig:
    """What every method has. Subclasses add their own knobs and set `method` / `calibrated`."""

    method: ClassVar[str]
    calibrated: ClassVar[bool]  # needs calibration activations (False: data-free, no calibration text read)
    bits: int
    group_size: int  # -1: one scale per output channel
    symmetric: bool  # True: the full signed grid, no zero points (quant/rtn.py); False: zero points
    quantize_lm_head: bool = False
    device: str = "auto"  # auto | cpu | cuda: where the walk computes
    calib: CalibOptions = field(default_factory=CalibOptions)
    source: QuantOptions = field(default_factory=QuantOptions, compare=False, repr=False)

    def record(self) -> dict[str, Any]:
        """The resolved settings as artifacts record them (see the module docstring)."""
        rest = self.source.model_dump(exclude={"method", "bits", "group_size", "symmetric"})
        return {
            "method": self.method,
            "bits": self.bits,
            "group_size": self.group_size,
            "symmetric": self.symmetric,
            **rest,
        }


@dataclass(frozen=True, kw_only=True)
class RTNConfig(QuantConfig):
    method: ClassVar[str] = "rtn"
    calibrated: ClassVar[bool] = False


@dataclass(frozen=True, kw_only=True)
class Int8Config(QuantConfig):
    """Weight-only int8 per output channel, symmetric (bits, group_size and symmetric are recorded, not used)."""

    method: ClassVar[str] = "int8"
    calibrated: ClassVar[bool] = False


@dataclass(frozen=True, kw_only=True)
class SmoothQuantConfig(QuantConfig):
    method: ClassVar[str] = "smoothquant"
    calibrated: ClassVar[bool] = True
    alpha: float = 0.5  # migration strength: s = absmax^alpha / w_absmax^(1 - alpha)


@dataclass(frozen=True, kw_only=True)
class GPTQConfig(QuantConfig):
    method: ClassVar[str] = "gptq"
    calibrated: ClassVar[bool] = True
    act_order: bool = False  # columns in decreasing diag(H) order (g_idx unless static_groups)
    damp_percent: float = 0.01
    block_size: int = 128
    range_search: bool = False  # each group's range searched (diag(H)-weighted MSE grid), not min-max
    static_groups: bool = (
        False  # group params from the weights before the sweep (then act_order needs no g_idx)
    )
    # True: each group's H from the block with the groups before it quantized (GPTQ's true-sequential mode; its
    # partial forwards replay the groups already done, about one forward a layer); False: every H from one forward
    # of the unquantized block (llm-compressor's order): 0.2-1.9% lower KL on the 30M fixture but one more forward a
    # layer (+26% CPU time there, bench/QUANT.md "Session 8"). resolve_quant fills in specs.default_true_sequential:
    # true-sequential at groups >= 128 and per channel, one pass below.
    true_sequential: bool = True
    # after the sweep, each group's scale re-solved for the codes it got (gptq.refit_scales; zero points and codes
    # unchanged, so every target's packing is unaffected)
    scale_refit: bool = False

    def record(self) -> dict[str, Any]:
        return {
            **super().record(),
            "true_sequential": self.true_sequential,
            "scale_refit": self.scale_refit,
        }  # the walk, for exported configs


@dataclass(frozen=True, kw_only=True)
class AWQConfig(QuantConfig):
    method: ClassVar[str] = "awq"
    calibrated: ClassVar[bool] = True
    grid: int = 20  # scale candidates searched per group
    clip: bool = True  # also search a clipping ratio per group (not for q/k)


@dataclass(frozen=True, kw_only=True)
class AWQGPTQConfig(GPTQConfig):
    """AWQ's scale search and folds (no clipping search), then GPTQ on the folded block: GPTQ's knobs + AWQ's grid."""

    method: ClassVar[str] = "awq-gptq"
    true_sequential: bool = False  # one pass: the scale choice's H is then the final solve's (bench/QUANT.md)
    grid: int = 20  # scale candidates searched per group
    # the scale folded per group: "awq", AWQ's best; "gptq", of AWQ's finalists and s = 1 the one of lowest GPTQ error
    scale_score: str = "gptq"
    # the range search in the scale choice's trial solves too (False: min-max there, the search only in the final
    # solve; 4 trial solves per group, so on the 8B shape the search in them was most of the method's GPU time)
    choice_search: bool = False
    # how many of AWQ's best scales (by its RTN loss) GPTQ's error chooses from, with s = 1 (scale_score "gptq");
    # resolve_quant fills in specs.default_choice_finalists (10 at groups >= 128, 3 below)
    choice_finalists: int = 3

    def record(self) -> dict[str, Any]:
        return {**super().record(), "choice_finalists": self.choice_finalists}


CONFIGS: dict[str, type[QuantConfig]] = {
    c.method: c for c in (RTNConfig, Int8Config, SmoothQuantConfig, GPTQConfig, AWQConfig, AWQGPTQConfig)
}


def _own(o: QuantOptions) -> dict[str, Any]:
    """The recipe fields that only one method reads, under that method's config names."""
    static = o.static_act_order and not o.act_order  # recipe act_order: true asks for the g_idx kind
    gptq = {
        "act_order": o.act_order or static,
        "static_groups": static,
        "damp_percent": o.damp_percent,
        "block_size": o.block_size,
        "range_search": o.range_search,
        "scale_refit": o.scale_refit,
    }
    return {
        "smoothquant": {"alpha": o.smooth_alpha},
        "gptq": gptq,
        "awq": {"grid": o.awq_grid, "clip": o.awq_clip},
        "awq-gptq": {**gptq, "grid": o.awq_grid},
    }.get(o.method, {})


def _shared(o: QuantOptions, requires_symmetric: bool) -> dict[str, Any]:
    return default_settings(o.method, o.bits, o.group_size, o.symmetric, requires_symmetric)


def resolve_quant(options: QuantOptions | dict, requires_symmetric: bool = False) -> QuantConfig:
    """The config of options.method, every default filled in (specs.default_settings). requires_symmetric: the
    target's kernels take no zero points (its TargetSpec says so), so an unset `symmetric` means symmetric."""
    o = options if isinstance(options, QuantOptions) else QuantOptions(**options)
    if o.method not in CONFIGS:
        raise ValueError(f"quant method {o.method!r} has no config (method 'none' quantizes nothing)")
    shared = _shared(o, requires_symmetric)
    if o.symmetric is None and requires_symmetric:
        o = o.model_copy(update={"symmetric": True})  # the source records what was resolved for the target
    if o.range_search is None:  # the method's default, recorded resolved (false where nothing searches)
        o = o.model_copy(update={"range_search": default_range_search(o.method, shared["group_size"], None)})
    if o.scale_refit is None:  # the method's default, recorded resolved
        o = o.model_copy(update={"scale_refit": default_scale_refit(o.method)})
    cls = CONFIGS[o.method]
    walk = (  # gptq and awq-gptq: the walk's one default, in specs
        {"true_sequential": default_true_sequential(o.method, shared["group_size"])}
        if issubclass(cls, GPTQConfig)
        else {}
    )
    if cls is AWQGPTQConfig:
        walk["choice_finalists"] = default_choice_finalists(shared["group_size"])
    return cls(
        **shared,
        quantize_lm_head=o.quantize_lm_head,
        device=o.device,
        calib=o.calib,
        source=o,
        **_own(o),
        **walk,
    )
