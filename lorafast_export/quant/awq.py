"""AWQ (Lin et al. 2024): protect salient input channels by scaling them up before RTN quantization.

Scale search (reference: casper-hansen/AutoAWQ awq/quantize/quantizer.py `_search_best_scale`,
`_compute_best_scale`): s = x_mean^r / w_mean^(1-r), normalised by sqrt(max·min), for r on a grid;
keep the s whose fake-quantized output Q(W·s)·(x/s) is closest (MSE) to the float output. Unlike the
reference, s = 1 (plain RTN) is also a candidate, so the result is never worse than RTN on the
calibration data; and dead channels (zero input or zero weights: pruned or zero-padded dims) keep s = 1
and stay out of the normalisation (awq_candidate_scale). Clip search (`_compute_best_clip`): shrink each
group's max |w| over a grid and keep the value minimising that group's output error. Folding s into the
previous op: quant.fold.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager

import torch

from lorafast_export.errors import InputError
from lorafast_export.qform import group_index
from lorafast_export.quant.fold import Folded, fold_scale_into_previous
from lorafast_export.quant.rtn import fake_quantize_rtn

__all__ = [
    "Folded",
    "awq_scale_finalists",
    "apply_clip",
    "awq_search_clip",
    "awq_search_scale",
    "clip_tokens",
    "fold_scale_into_previous",
]

ForwardFn = Callable[[Sequence[torch.Tensor]], torch.Tensor]


def awq_search_scale(*args, **kwargs) -> torch.Tensor:
    """awq_scale_finalists' best (same arguments): the s whose quantized output is closest to the float one."""
    return awq_scale_finalists(*args, **kwargs)[0]


def awq_scale_finalists(
    weights: Sequence[torch.Tensor],
    x: torch.Tensor,
    bits: int,
    group_size: int,
    n_grid: int = 20,
    symmetric: bool = False,
    duo_scaling: bool = True,
    forward_fn: ForwardFn | None = None,
    scale_dtype: torch.dtype = torch.float16,
    screen: Callable[[], AbstractContextManager] | None = None,
    finalists: int = 3,
    rescore: bool = True,
) -> list[torch.Tensor]:
    """Linears sharing one input (each [out_i, in]), calibration input x [tokens, in] → s [in].

    forward_fn(candidate_weights) → output; it must run the block on x with the given weights in place
    of `weights` (e.g. the whole attention for q/k/v). Default: the concatenated linear outputs x·Wᵢᵀ.
    screen: a context (bf16 autocast on a CPU that has bf16 matmuls) in which every candidate is scored first;
    only the `finalists` best of them and s = 1 are then scored as without it, and the best of those wins, so
    the choice is made in the caller's precision and s is never worse than RTN on the calibration data.
    Returns the `finalists` best scales and s = 1 (a list of finalists + 1 or fewer), best first.
    rescore False (a caller that decides among the finalists by its own measure: awq-gptq): with a screen, the
    screen's `finalists` best and s = 1, in the screen's order, without scoring them again.
    """
    x = x.detach().reshape(-1, x.shape[-1]).float()  # [tokens, in]
    _check_awq_args(weights, x.shape[1], group_size, n_grid)
    weights = [w.detach().float() for w in weights]
    forward = forward_fn or (lambda ws: torch.cat([x @ w.T for w in ws], dim=-1))  # [tokens, Σ out]
    x_mean = x.abs().mean(dim=0)  # [in]
    w_mean = _weight_mean(weights, group_size)  # [in]
    candidates = [torch.ones_like(x_mean)] + [  # s = 1 (plain RTN) first: ties keep the earlier candidate
        awq_candidate_scale(x_mean, w_mean, r / n_grid, duo_scaling) for r in range(n_grid)
    ]

    def losses(which: Sequence[int]) -> dict[int, float]:
        reference = forward(weights).float()  # once per scoring pass, not once per candidate
        out = {}
        for i in which:
            loss = _quant_loss(
                forward, reference, weights, candidates[i], bits, group_size, symmetric, scale_dtype
            )
            out[i] = loss if loss == loss else float("inf")  # NaN never wins
        return out

    with torch.no_grad():
        which = list(range(len(candidates)))
        if (
            forward_fn is None and x.device.type == "cpu"
        ):  # a linear output: every candidate from XᵀX (_gram_loss)
            gram = _gram(x)
            fine = {
                i: _gram_loss(gram, x.shape[0], weights, c, bits, group_size, symmetric, scale_dtype)
                for i, c in enumerate(candidates)
            }
            return _ranked(candidates, fine, finalists)
        if screen is not None:
            with screen():
                coarse = losses(which)
            if not rescore:
                return _ranked(candidates, coarse, finalists)
            which = sorted({0, *sorted(which, key=lambda i: (coarse[i], i))[:finalists]})
        fine = losses(which)
    return _ranked(candidates, fine, finalists)


def _ranked(candidates: list[torch.Tensor], loss: dict[int, float], finalists: int) -> list[torch.Tensor]:
    """The `finalists` scored candidates of lowest loss and s = 1 (index 0), best first; ties keep the earlier."""
    order = sorted(loss, key=lambda i: (loss[i], i))
    keep = order[:finalists]
    return [candidates[i] for i in (keep if 0 in keep else [*keep, 0])]


def awq_candidate_scale(
    x_mean: torch.Tensor, w_mean: torch.Tensor, ratio: float, duo_scaling: bool = True
) -> torch.Tensor:
    """x_mean, w_mean [in] → s [in] = x_mean^r / w_mean^(1-r), normalised so that max·min = 1 over the live channels.

    A dead channel (x_mean = 0: its calibration input is all zero; or w_mean = 0: its column is zero in every linear)
    adds nothing to the group's output whatever its s, so it keeps s = 1 (RTN's: its weights and the previous op's
    row stay as they are) and is left out of the normalisation. Counted in, its clamped 1e-4 would be the min and
    would inflate every live s by ~sqrt(max / 1e-4) (x100-300 on a model widened with zero dims or a pruned one); the
    fold into a previous linear (up_proj's rows / s_down) then shrank that linear's live weights below float16's
    smallest normal scale, and its quantized output was mostly zero (KL 0.2 nats). A model without dead channels
    (every channel of every real calibration set) gets exactly the reference's s."""
    if duo_scaling:
        s = (x_mean.pow(ratio) / (w_mean.pow(1 - ratio) + 1e-4)).clamp(min=1e-4)
    else:
        s = x_mean.pow(ratio).clamp(min=1e-4)
    live = (x_mean > 0) & (w_mean > 0)
    if not bool(live.any()):
        return torch.ones_like(s)
    kept = s[live]
    return torch.where(live, s / (kept.max() * kept.min()).sqrt(), torch.ones_like(s))


def _weight_mean(weights: Sequence[torch.Tensor], group_size: int) -> torch.Tensor:
    """Mean over rows of |w| normalised by its group's max |w| → [in] (AWQ's w_mean)."""
    w = torch.cat(list(weights), dim=0)  # [Σ out, in]
    gs = w.shape[1] if group_size == -1 else group_size
    padded = pad_to_groups(w.abs(), gs)  # [Σ out, G · gs]
    groups = padded.reshape(-1, gs)  # [Σ out · G, gs]
    normed = groups / (groups.amax(dim=1, keepdim=True) + 1e-6)
    return normed.reshape(padded.shape)[:, : w.shape[1]].mean(dim=0)


def pad_to_groups(t: torch.Tensor, gs: int, value: float | None = None) -> torch.Tensor:
    """[rows, in] → [rows, ceil(in/gs)·gs]: a ragged last group (in not a multiple of gs, as the quantizer
    allows) is filled up with copies of the last column, which leave that group's min, max and absmax as they
    are (value: fill with this constant instead, e.g. 0 for activations, so padded columns add nothing)."""
    pad = -t.shape[1] % gs
    if not pad:
        return t
    fill = t[:, -1:].expand(-1, pad) if value is None else t.new_full((t.shape[0], pad), value)
    return torch.cat([t, fill], dim=1)


def _scaled_fake_quant(
    w: torch.Tensor, s: torch.Tensor, bits: int, group_size: int, symmetric: bool, scale_dtype: torch.dtype
) -> torch.Tensor:
    """Q(W·s)/s: the weight a candidate input scale s leaves after RTN, in W's input space."""
    return fake_quantize_rtn(w * s[None, :], bits, group_size, symmetric, scale_dtype) / s[None, :]


def _quant_loss(
    forward: ForwardFn,
    reference: torch.Tensor,
    weights: Sequence[torch.Tensor],
    s: torch.Tensor,
    bits: int,
    group_size: int,
    symmetric: bool,
    scale_dtype: torch.dtype,
) -> float:
    """MSE between the float output and the output with Q(W·s)/s (≡ Q(W·s) applied to x/s)."""
    fq = [_scaled_fake_quant(w, s, bits, group_size, symmetric, scale_dtype) for w in weights]
    d = forward(fq).float()  # a fresh tensor (or a float32 copy of one): updated in place below
    return float(d.sub_(reference).pow_(2).mean())


def _gram(x: torch.Tensor) -> torch.Tensor:
    """x [tokens, in] → XᵀX [in, in] float32, computed in float32 whatever autocast is on."""
    with torch.autocast(x.device.type, enabled=False):
        return x.float().T @ x.float()


def _gram_loss(
    gram: torch.Tensor,
    tokens: int,
    weights: Sequence[torch.Tensor],
    s: torch.Tensor,
    bits: int,
    group_size: int,
    symmetric: bool,
    scale_dtype: torch.dtype,
) -> float:
    """_quant_loss of a linear output without running it: mean over tokens and outputs of (x·Dᵀ)², D = Q(W·s)/s - W,
    is Σ_rows D G Dᵀ / (tokens · Σ out) with G = XᵀX: [out, in] x [in, in] per candidate instead of [tokens, in] x
    [in, out] (the down_proj of the 30M fixture: 12x fewer operations), in float32 with a float64 sum. Used on the
    CPU only: on CUDA the walk's bf16 forward is as fast at the 8B shape and that path stays as it was."""
    total, rows = 0.0, 0
    for w in weights:
        d = _scaled_fake_quant(w, s, bits, group_size, symmetric, scale_dtype) - w
        with torch.autocast(d.device.type, enabled=False):
            total += float(((d @ gram) * d).sum(dtype=torch.float64))
        rows += w.shape[0]
    loss = total / (tokens * rows)
    return loss if loss == loss else float("inf")  # NaN never wins


def awq_search_clip(
    w: torch.Tensor,
    x: torch.Tensor,
    bits: int,
    group_size: int,
    symmetric: bool = False,
    n_grid: int = 20,
    max_shrink: float = 0.5,
    n_sample_tokens: int = 512,
    out_chunk: int = 64,
    scale_dtype: torch.dtype = torch.float16,
) -> torch.Tensor:
    """w [out, in] (already scaled), its input x [tokens, in] → max |w| per group [out, G] to clip to."""
    x = clip_tokens(x, n_sample_tokens)  # [tokens', in] float32
    _check_awq_args([w], x.shape[1], group_size, n_grid)
    gs = w.shape[1] if group_size == -1 else group_size
    xp = pad_to_groups(x, gs, value=0.0)  # zero inputs: the padded columns add nothing to any output
    xg = xp.reshape(1, -1, xp.shape[1] // gs, gs)  # [1, tokens', G, gs]
    best = [
        _best_clip_chunk(
            pad_to_groups(c.float(), gs), xg, bits, group_size, symmetric, n_grid, max_shrink, scale_dtype
        )
        for c in w.detach().split(out_chunk, dim=0)
    ]
    return torch.cat(best, dim=0)


def clip_tokens(x: torch.Tensor, n_sample_tokens: int = 512) -> torch.Tensor:
    """The tokens the clip search scores on: every (tokens // n)-th row of x [..., in] → [tokens', in] float32.
    Sampling an already sampled x again keeps it whole (fewer than 2n rows: step 1)."""
    x = x.detach().reshape(-1, x.shape[-1])
    return x[:: max(1, x.shape[0] // n_sample_tokens)].float()


def _best_clip_chunk(
    w: torch.Tensor,
    xg: torch.Tensor,
    bits: int,
    group_size: int,
    symmetric: bool,
    n_grid: int,
    max_shrink: float,
    scale_dtype: torch.dtype,
) -> torch.Tensor:
    """w [oc, G·gs] (pad_to_groups), xg [1, tokens, G, gs] → best max_val [oc, G] by per-group output MSE."""
    oc, n_groups, gs = w.shape[0], xg.shape[2], xg.shape[3]
    wg = w.reshape(oc, 1, n_groups, gs)  # [oc, 1, G, gs]
    org_max = wg.abs().amax(dim=-1, keepdim=True)  # [oc, 1, G, 1]
    org_out = torch.einsum("tgk,ogk->otg", xg[0], wg[:, 0])  # [oc, tokens, G] per-group partial outputs
    best_max, min_err = org_max.clone(), torch.full_like(org_max, float("inf"))
    for i_s in range(int(max_shrink * n_grid)):
        max_val = org_max * (1 - i_s / n_grid)
        cur = torch.clamp(wg, -max_val, max_val).reshape(oc, -1)
        q = fake_quantize_rtn(cur, bits, group_size, symmetric, scale_dtype).reshape(wg.shape)
        err = (
            (torch.einsum("tgk,ogk->otg", xg[0], q[:, 0]) - org_out).pow(2).mean(dim=1).reshape(org_max.shape)
        )
        better = err < min_err
        min_err[better], best_max[better] = err[better], max_val[better]
    return best_max.reshape(oc, n_groups)


def apply_clip(w: torch.Tensor, max_val: torch.Tensor, group_size: int) -> torch.Tensor:
    """w [out, in], max_val [out, G] → w clamped to [-max_val, max_val] per group (same dtype)."""
    m = max_val.to(w.dtype)[:, group_index(w.shape[1], group_size).to(w.device)]  # [out, in]
    return torch.clamp(w, -m, m)


def _check_awq_args(weights: Sequence[torch.Tensor], in_features: int, group_size: int, n_grid: int) -> None:
    problems = [
        f"weights[{i}] {tuple(w.shape)} must be [out, in={in_features}] (the width of x)"
        for i, w in enumerate(weights)
        if w.dim() != 2 or w.shape[1] != in_features
    ]
    if not weights:
        problems.append("no weights given")
    if group_size != -1 and group_size <= 0:
        problems.append(f"group_size={group_size}: use a positive group size (e.g. 128) or -1 (per channel)")
    if n_grid <= 0:
        problems.append(f"n_grid={n_grid}: use a positive grid size such as 20")
    if problems:
        raise InputError("awq: " + "; ".join(problems))
