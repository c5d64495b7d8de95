"""The quantization methods as the calibration walk runs them: one function per method, block in, QTensors out.

Each function quantizes every linear of one Block (a decoder layer or the lm_head block), replaces it in
the block by a fake-quant QLinear (so the walk's next activations come from the quantized block), folds
any smoothing scale into the group's previous op (Block.set_param), and returns {relative name: QTensor}.
The math lives in rtn/int8/gptq/awq/smoothquant/fold; this file only decides what feeds what.

- rtn / int8: data-free, each weight on its own.
- gptq: sequential within the block (q,k,v → o → gate,up → down): each group's Hessian is accumulated from
  inputs produced by the already-quantized groups before it (GPTQ's true-sequential mode, gptq's default;
  true_sequential off, below group 128 for both methods: every group's from one forward of the unquantized block); the linears of a group share that Hessian and are solved as one
  stacked matrix (gptq_quantize_many).
- awq: one forward captures each group's input; per group a scale search (loss: the whole attention /
  MLP for q,k,v / gate,up; the linear outputs otherwise), folded into the previous op
  (input_layernorm; v_proj rows only when v_proj's outputs are o_proj's inputs, i.e. no GQA;
  post_attention_layernorm; up_proj rows); then the optional clip search (not for q/k), then RTN.
- awq-gptq: awq's scale search and folds (no clipping search), then gptq on the folded block (its Hessians from
  the scaled inputs): the scales protect the salient channels, GPTQ's error feedback does the rounding. Which scale
  is folded (scale_score, default "gptq"): of AWQ's finalists (choice_finalists: its 10 best at groups >= 128, 3
  below, not re-scored in float32) and s = 1, the one under which GPTQ's own output error
  on the group's calibration input is lowest, so a group that AWQ's scale would not help keeps s = 1 ("awq": AWQ's
  best, as before; on the 30M fixture 3.6% higher KL, bench/QUANT.md). The trial solves of that choice use min-max
  group ranges; the range search, where on, runs in the final solve only (choice_search: in the trials too).
- smoothquant: per-channel activation absmax, s = absmax^α / w_absmax^(1-α) folded into
  input_layernorm, post_attention_layernorm and up_proj rows; every linear W8A8.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from lorafast_export.errors import InputError
from lorafast_export.qform import QTensor, dequantize, qtensor_to, with_fields
from lorafast_export.quant.awq import apply_clip, awq_scale_finalists, awq_search_clip, clip_tokens
from lorafast_export.quant.blocks import Block, Group
from lorafast_export.quant.config import (
    AWQConfig,
    AWQGPTQConfig,
    GPTQConfig,
    Int8Config,
    QuantConfig,
    RTNConfig,
    SmoothQuantConfig,
)
from lorafast_export.quant.fold import fold_scale_into_previous
from lorafast_export.quant.gptq import RangeSearch, accumulate_hessian, gptq_quantize_many
from lorafast_export.quant.int8 import quantize_int8_weight
from lorafast_export.quant.rtn import quantize_rtn
from lorafast_export.quant.smoothquant import quantize_w8a8, smooth_scales, weight_input_absmax

SCALE_DTYPE = torch.float16  # 4-bit scales: exactly what GPTQ/AWQ checkpoints store
NO_CLIP = ("self_attn.q_proj", "self_attn.k_proj")  # clipping q/k hurts the softmax (AutoAWQ skips them)
AWQ_SEARCH_TOKENS = (
    65536  # calibration tokens the AWQ scale search scores each candidate on (AutoAWQ: 128 x 512)
)


RANGE_SEARCH = (
    RangeSearch()
)  # quant.range_search: GPTQ's mse grid (100 points, down to 0.2x), diag(H)-weighted


@dataclass(frozen=True)
class Method:
    name: str
    config: type[QuantConfig]  # its settings (quant/config.py); config.calibrated: needs activations
    quantize_block: Callable[[Block, QuantConfig], dict[str, QTensor]]

    @property
    def calibrated(self) -> bool:
        return self.config.calibrated


def _linears(block: Block) -> list[str]:
    return [n for g in block.groups for n in g.linears]


def _finish(block: Block, qts: dict[str, QTensor]) -> dict[str, QTensor]:
    for name, qt in qts.items():
        block.set_linear(name, qt)
    return {n: qtensor_to(qt, "cpu") for n, qt in qts.items()}


def _bias(block: Block, name: str) -> torch.Tensor | None:
    b = block.bias(name)
    return None if b is None else b.to(block.fp_dtype)


# ---------------------------------------------------------------------------------------- data-free


def quantize_block_rtn(block: Block, s: RTNConfig) -> dict[str, QTensor]:
    return _finish(
        block,
        {
            n: quantize_rtn(block.weight(n), s.bits, s.group_size, s.symmetric, SCALE_DTYPE, _bias(block, n))
            for n in _linears(block)
        },
    )


def quantize_block_int8(block: Block, s: Int8Config) -> dict[str, QTensor]:
    return _finish(
        block, {n: quantize_int8_weight(block.weight(n), _bias(block, n)) for n in _linears(block)}
    )


# ---------------------------------------------------------------------------------------------- GPTQ


def _hessians(block: Block, firsts: list[str]) -> dict[str, torch.Tensor]:
    """GPTQ's H of each named linear's input, all from one forward of the block as it is now."""
    acc: dict[str, dict] = {n: {"H": None, "n": 0} for n in firsts}

    def add(name: str):
        def fn(x: torch.Tensor) -> None:
            acc[name]["H"], acc[name]["n"] = accumulate_hessian(acc[name]["H"], acc[name]["n"], x)

        return fn

    block.run({n: add(n) for n in firsts}, stop_after=firsts[-1])
    return {n: a["H"] for n, a in acc.items()}


def quantize_block_gptq(block: Block, s: GPTQConfig) -> dict[str, QTensor]:
    """true_sequential (gptq's default): each group's H from inputs produced by the groups quantized before it (one
    forward per group); off (awq-gptq's default): every H from one forward of the unquantized block
    (llm-compressor's order)."""
    out: dict[str, QTensor] = {}
    hessians = None if s.true_sequential else _hessians(block, [g.linears[0] for g in block.groups])
    for g in block.groups:
        first = g.linears[0]
        H = _hessians(block, [first])[first] if hessians is None else hessians[first]
        qts = _gptq_solve(
            block, s, [block.weight(n) for n in g.linears], H, [_bias(block, n) for n in g.linears]
        )
        out.update(_finish(block, dict(zip(g.linears, qts, strict=True))))
        block.freeze(list(g.linears))  # later forwards of this block replay what the group computes
    return out


# ----------------------------------------------------------------------------------------------- AWQ


def foldable(block: Block, g: Group) -> bool:
    """A scale can be folded into `prev` only if prev's output channels are exactly the linears' inputs."""
    prev = block.get(g.prev)
    n_out = prev.weight.shape[0]
    return all(block.weight(n).shape[1] == n_out for n in g.linears)


def _fold(block: Block, g: Group, s: torch.Tensor) -> None:
    prev = block.get(g.prev)
    prev_bias = getattr(prev, "bias", None)
    f = fold_scale_into_previous(
        prev.weight.detach(),
        [block.weight(n) for n in g.linears],
        s,
        None if prev_bias is None else prev_bias.detach(),
    )
    if f.prev_weight.dim() == 1:  # a norm: it stays fp, so round it the way it will be stored
        block.set_param(f"{g.prev}.weight", f.prev_weight)
    else:  # a linear of this block: quantized later, from float32
        prev.weight.data = f.prev_weight
    if f.prev_bias is not None:
        prev.bias.data = f.prev_bias
    for name, w in zip(g.linears, f.linears, strict=True):
        block.get(name).weight.data = w


def _awq_loss_fn(block: Block, g: Group, x: torch.Tensor):
    """The group's block (attention / MLP) on x with candidate weights. On the CPU under autocast (AWQ's bf16
    screen), x is cast once per dtype instead of once per linear that reads it (q, k, v; gate, up): the same values,
    since those linears are all that read the block's input; and the rotary cos / sin are cast too, so q and k stay
    in bf16 through the rotation into SDPA instead of going to float32 and back (the screen only ranks: the
    finalists are scored again in float32)."""
    if g.block is None:
        return None  # awq_search_scale's default: the concatenated linear outputs
    prefix = g.block + "."
    names = [n.removeprefix(prefix) + ".weight" for n in g.linears]
    cast: dict[torch.dtype, torch.Tensor] = {}

    def forward(ws):
        xi, dtype = x, None
        if x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            dtype = torch.get_autocast_dtype("cpu")
            xi = cast.setdefault(dtype, x.to(dtype))
        return block.sub_forward(g.block, xi, dict(zip(names, ws, strict=True)), dtype)

    return forward


def _clip_rows(x: torch.Tensor, group_size: int) -> int:
    """Rows of w per clip-search step: AutoAWQ's 64 on the CPU; on CUDA as many as keep the per-group
    outputs [rows, tokens, groups] near 2^28 floats (the result does not depend on it)."""
    if not x.is_cuda:
        return 64
    groups = 1 if group_size == -1 else x.shape[-1] // group_size
    return max(64, (1 << 28) // (x.shape[0] * groups))


def awq_fold_scales(
    block: Block,
    s: AWQConfig | AWQGPTQConfig,
    inputs: dict[str, torch.Tensor],
    choose: Callable[[Group, list[torch.Tensor], torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """AWQ's scale search for every foldable group of the block, each scale folded into the group's previous op
    as it is found → {linear name: folded s [in]}. inputs: block.capture_inputs of the groups' first linears.
    choose(group, finalists (best first, s = 1 among them), the group's input x): the scale to fold (default:
    AWQ's best)."""
    scale_of: dict[str, torch.Tensor] = {}
    for g in block.groups:
        if not foldable(block, g):
            continue  # e.g. v_proj → o_proj under grouped-query attention
        x = inputs[g.linears[0]]
        xs = x[: max(1, AWQ_SEARCH_TOKENS // x.shape[1])]  # [samples', seq, in]: the grid runs 20+ forwards
        with block.autocast():  # the candidates' forwards in the walk's precision (bf16 on CUDA)
            finalists = awq_scale_finalists(
                [block.weight(n) for n in g.linears],
                xs,
                s.bits,
                s.group_size,
                n_grid=s.grid,
                symmetric=s.symmetric,
                forward_fn=_awq_loss_fn(block, g, xs),
                scale_dtype=SCALE_DTYPE,
                screen=block.screen(),
                finalists=s.choice_finalists if choose is not None else 3,  # a chooser is awq-gptq's
                rescore=choose is None,  # a chooser scores the finalists itself
            )
        sc = finalists[0] if choose is None else choose(g, finalists, x)
        _fold(block, g, sc)
        scale_of.update({n: sc for n in g.linears})
    return scale_of


def _with_input_scales(qts: dict[str, QTensor], scale_of: dict[str, torch.Tensor]) -> dict[str, QTensor]:
    return {
        n: with_fields(qt, input_scale=scale_of[n].float().to(qt.codes.device).clone())
        if n in scale_of
        else qt
        for n, qt in qts.items()
    }


def quantize_block_awq(block: Block, s: AWQConfig) -> dict[str, QTensor]:
    bits, gs, sym = s.bits, s.group_size, s.symmetric
    inputs = block.capture_inputs([g.linears[0] for g in block.groups])  # one forward, before any fold
    scale_of = awq_fold_scales(block, s, inputs)
    qts = {}
    for g in block.groups:
        x = clip_tokens(inputs[g.linears[0]])  # [tokens', in] float32
        if g.linears[0] in scale_of:
            x = x / scale_of[g.linears[0]]  # what the linears see after the fold
        for name in g.linears:
            w = block.weight(name)
            if s.clip and not name.endswith(NO_CLIP):
                clip = awq_search_clip(
                    w, x, bits, gs, symmetric=sym, out_chunk=_clip_rows(x, gs), scale_dtype=SCALE_DTYPE
                )
                w = apply_clip(w, clip, gs)
            qts[name] = quantize_rtn(w, bits, gs, sym, SCALE_DTYPE, _bias(block, name))
    return _finish(block, _with_input_scales(qts, scale_of))


def quantize_block_awq_gptq(block: Block, s: AWQGPTQConfig) -> dict[str, QTensor]:
    """AWQ's scales searched and folded first (no clipping search: GPTQ's error feedback takes its place), then
    GPTQ on the scaled weights, its Hessians accumulated from the folded block's own (scaled) inputs."""
    inputs = block.capture_inputs([g.linears[0] for g in block.groups])  # one forward, before any fold
    if s.scale_score not in ("awq", "gptq"):
        raise InputError(f"awq-gptq: scale_score={s.scale_score!r}; use 'gptq' (the default) or 'awq'.")
    choose = (lambda g, fin, x: _gptq_choice(block, s, g, fin, x)) if s.scale_score == "gptq" else None
    scale_of = awq_fold_scales(block, s, inputs, choose)
    del inputs  # GPTQ runs the folded block again, group by group
    return _with_input_scales(quantize_block_gptq(block, s), scale_of)


def _gptq_solve(
    block: Block,
    s: GPTQConfig,
    weights: list[torch.Tensor],
    H: torch.Tensor,
    biases: list | None = None,
    search: bool | None = None,
    refit: bool | None = None,
) -> list[QTensor]:
    """search / refit: the range search / the scale refit on or off for this solve (None: the config's)."""
    search = s.range_search if search is None else search
    refit = s.scale_refit if refit is None else refit
    return gptq_quantize_many(  # the group's linears share H: one solve on their stacked rows
        weights,
        H,
        s.bits,
        s.group_size,
        s.symmetric,
        act_order=s.act_order,
        damp_percent=s.damp_percent,
        block_size=s.block_size,
        scale_dtype=SCALE_DTYPE,
        biases=biases,
        search=RANGE_SEARCH if search else None,
        static_groups=s.static_groups,
        refit=refit,
    )


def _gptq_choice(
    block: Block, s: AWQGPTQConfig, g: Group, finalists: list[torch.Tensor], x: torch.Tensor
) -> torch.Tensor:
    """Of AWQ's finalists (s = 1 among them), the scale under which GPTQ's own error on the group's calibration
    input x is lowest: Σ_rows D H Dᵀ, D = Q(W·s)/s - W, each solve on W·s with H scaled to match (diag(1/s) H
    diag(1/s)). So the combined method is never worse than plain GPTQ by GPTQ's measure on these inputs (the default
    one-pass walk's final solve uses this H as folded, up to the fold's rounding; with true_sequential the final H
    comes later from the quantized groups before). These trial solves use
    min-max group ranges unless s.choice_search (the range search, when on, runs in the final solve)."""
    H, _ = accumulate_hessian(None, 0, x)
    weights = [block.weight(n).float() for n in g.linears]
    best, best_err = finalists[0], float("inf")
    for sc in finalists:
        qts = _gptq_solve(
            block,
            s,
            [w * sc[None, :] for w in weights],
            H / sc[:, None] / sc[None, :],
            search=s.range_search and s.choice_search,
            refit=False,  # the refit in these trials changed no choice on the 30M fixture (session 10)
        )
        err = 0.0
        for qt, w in zip(qts, weights, strict=True):
            d = dequantize(qt) / sc[None, :] - w
            err += float(((d @ H) * d).sum(dtype=torch.float64))
        if err < best_err:
            best, best_err = sc, err
    return best


# --------------------------------------------------------------------------------------- SmoothQuant


def quantize_block_smoothquant(block: Block, s: SmoothQuantConfig) -> dict[str, QTensor]:
    smoothed = [g for g in block.groups if foldable(block, g) and g.prev != "self_attn.v_proj"]
    absmax: dict[str, torch.Tensor] = {}

    def track(name: str):
        def fn(x: torch.Tensor) -> None:
            m = x.detach().abs().reshape(-1, x.shape[-1]).amax(dim=0).float()  # [in]
            absmax[name] = m if name not in absmax else torch.maximum(absmax[name], m)

        return fn

    firsts = [g.linears[0] for g in smoothed]
    if firsts:
        block.run({n: track(n) for n in firsts}, stop_after=firsts[-1])
    scale_of: dict[str, torch.Tensor] = {}
    for g in smoothed:
        sc = smooth_scales(
            absmax[g.linears[0]], weight_input_absmax([block.weight(n) for n in g.linears]), s.alpha
        )
        _fold(block, g, sc)
        scale_of.update({n: sc for n in g.linears})
    return _finish(
        block, {n: quantize_w8a8(block.weight(n), scale_of.get(n), _bias(block, n)) for n in _linears(block)}
    )


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("rtn", RTNConfig, quantize_block_rtn),
        Method("int8", Int8Config, quantize_block_int8),
        Method("smoothquant", SmoothQuantConfig, quantize_block_smoothquant),
        Method("gptq", GPTQConfig, quantize_block_gptq),
        Method("awq", AWQConfig, quantize_block_awq),
        Method("awq-gptq", AWQGPTQConfig, quantize_block_awq_gptq),
    )
}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise InputError(f"quant method {name!r} is unknown; choose one of: {', '.join(METHODS)}.")
    return METHODS[name]
