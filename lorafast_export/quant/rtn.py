"""Round-to-nearest quantization and the per-group parameter math that GPTQ and AWQ reuse.

Symmetric (the full signed grid, NNCF's rule): the group's extreme, the endpoint of larger magnitude WITH its sign,
maps exactly onto the lowest signed level -2**(bits-1): scale = extreme / -2**(bits-1), implicit zero 2**(bits-1), so
codes use all of [0, 2**bits - 1] (int4: -8..7) and the extreme is never clipped. The scale is negative when the
extreme is positive; the other side reaches +(2**(bits-1) - 1) steps and clips beyond that (bench/QUANT.md "grid"
has the measurements against absmax/7 and GPTQ's 2·absmax/15).
Asymmetric: the range [min(w_min, 0), max(w_max, 0)] (zero is always representable) maps onto
[0, 2**bits - 1]; zero = round(-min / scale). Scales are rounded UP to `scale_dtype` (no clipping, error
<= scale/2) BEFORE the codes are computed, so a checkpoint storing float16 scales reproduces the IR exactly.
"""

from __future__ import annotations

import torch

from lorafast_export.dtypes import all_finite
from lorafast_export.errors import InputError
from lorafast_export.qform import SCALE_DTYPES, SUPPORTED_BITS, QTensor, dequantize, group_index, n_groups_for


def check_quant_args(
    w: torch.Tensor, bits: int, group_size: int, scale_dtype: torch.dtype, where: str
) -> None:
    """Raise InputError naming every bad argument of a weight quantizer at once."""
    problems = []
    if w.dim() != 2 or not w.is_floating_point():
        problems.append(f"w must be a float [out, in] weight, got {w.dtype} {tuple(w.shape)}")
    elif not all_finite(w):
        problems.append("w holds NaN or inf; fix the merged weights before quantizing")
    if bits not in SUPPORTED_BITS:
        problems.append(f"bits={bits}: use one of {SUPPORTED_BITS}")
    if group_size != -1 and group_size <= 0:
        problems.append(f"group_size={group_size}: use -1 (per channel) or a positive size such as 128")
    if scale_dtype not in SCALE_DTYPES:
        problems.append(f"scale_dtype={scale_dtype}: use one of {SCALE_DTYPES}")
    if problems:
        raise InputError(f"{where}: " + "; ".join(problems))


def group_minmax(w: torch.Tensor, g: torch.Tensor, n_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in], g [in] group of each column → (min, max) each [out, n_groups]."""
    idx = g.to(w.device).expand_as(w)  # [out, in]
    empty = torch.zeros(w.shape[0], n_groups, dtype=w.dtype, device=w.device)
    wmin = empty.scatter_reduce(1, idx, w, "amin", include_self=False)
    wmax = empty.scatter_reduce(1, idx, w, "amax", include_self=False)
    return wmin, wmax


def qparams(
    wmin: torch.Tensor,
    wmax: torch.Tensor,
    bits: int,
    symmetric: bool,
    scale_dtype: torch.dtype = torch.float16,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-group range [...] → (scale [...] in scale_dtype, zero [...] uint8 or None if symmetric)."""
    maxq = 2**bits - 1
    tiny = torch.finfo(scale_dtype).tiny
    if symmetric:
        return symmetric_scale(wmin, wmax, bits, scale_dtype), None
    lo = wmin.float().clamp(max=0.0)
    hi = wmax.float().clamp(min=0.0)
    scale = round_up_to_dtype(_ieee_div(hi - lo, maxq).clamp(min=tiny), scale_dtype)
    zero = torch.round(-lo / scale.float()).clamp(0, maxq).to(torch.uint8)
    return scale, zero


def symmetric_scale(
    wmin: torch.Tensor, wmax: torch.Tensor, bits: int, scale_dtype: torch.dtype
) -> torch.Tensor:
    """Per-group range [...] → signed symmetric scale [...] in scale_dtype: extreme / -2**(bits-1) (module doc).

    Its magnitude is rounded UP to scale_dtype, so the extreme lands on -2**(bits-1) or just inside; a group whose
    extreme is 0 gets the smallest positive scale. Ties (|min| = max) take the negative end: a positive scale."""
    tiny = torch.finfo(scale_dtype).tiny
    extreme = torch.where(wmin.abs() >= wmax.abs(), wmin, wmax).float()
    magnitude = round_up_to_dtype(_ieee_div(extreme.abs(), 2 ** (bits - 1)).clamp(min=tiny), scale_dtype)
    return torch.where(extreme > 0, -magnitude, magnitude)


def _ieee_div(x: torch.Tensor, d: int) -> torch.Tensor:
    """x / d, correctly rounded on every device: CUDA divides by a Python scalar through its reciprocal
    (1 ulp off at times), which would make CUDA scales differ from the CPU's; a tensor divisor does not."""
    return x / torch.full((), float(d), dtype=x.dtype, device=x.device)


def round_up_to_dtype(scale: torch.Tensor, scale_dtype: torch.dtype) -> torch.Tensor:
    """float32 scale → the smallest scale_dtype value >= it, so rounding the scale never clips the range."""
    cast = scale.to(scale_dtype)
    low = cast.float() < scale
    cast = torch.where(low, torch.nextafter(cast, torch.full_like(cast, float("inf"))), cast)
    if not all_finite(cast):
        raise InputError(
            f"weights too large for {scale_dtype} scales (max scale overflows); "
            "quantize with scale_dtype=torch.float32"
        )
    return cast


def quantize_codes(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int
) -> torch.Tensor:
    """w [out, k], per-column scale/zero [out, k] (or broadcastable) → uint8 codes [out, k]."""
    z = 2.0 ** (bits - 1) if zero is None else zero.float()
    q = torch.round(w.float() / scale.float()) + z
    return q.clamp(0, 2**bits - 1).to(torch.uint8)


def quantize_rtn(
    w: torch.Tensor,
    bits: int,
    group_size: int,
    symmetric: bool,
    scale_dtype: torch.dtype = torch.float16,
    bias: torch.Tensor | None = None,
) -> QTensor:
    """w [out, in] → QTensor by min-max (asymmetric) or absmax (symmetric) round-to-nearest per group."""
    check_quant_args(w, bits, group_size, scale_dtype, where="quantize_rtn")
    n_groups = n_groups_for(w.shape[1], group_size)
    wf = w.detach().float()
    if (
        group_size == -1 or w.shape[1] % group_size == 0
    ):  # whole groups: a reshape, not scatters (same values)
        wg = wf.reshape(w.shape[0], n_groups, -1)  # [out, G, gs]
        scale, zero = qparams(wg.amin(dim=2), wg.amax(dim=2), bits, symmetric, scale_dtype)  # [out, G]
        codes = quantize_codes(wg, scale[..., None], None if zero is None else zero[..., None], bits)
        return weight_qtensor(codes.reshape(w.shape), scale, zero, bits, group_size, bias)
    g = group_index(w.shape[1], group_size).to(w.device)  # [in]
    scale, zero = qparams(*group_minmax(wf, g, n_groups), bits, symmetric, scale_dtype)  # [out, G]
    codes = quantize_codes(wf, scale[:, g], None if zero is None else zero[:, g], bits)  # [out, in]
    return weight_qtensor(codes, scale, zero, bits, group_size, bias)


def weight_qtensor(
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bits: int,
    group_size: int,
    bias: torch.Tensor | None,
    g_idx: torch.Tensor | None = None,
) -> QTensor:
    """A weight quantizer's results as a QTensor (RTN, GPTQ); it owns a copy of the bias."""
    return QTensor(
        codes=codes,
        scales=scales,
        zeros=zeros,
        bits=bits,
        group_size=group_size,
        g_idx=g_idx,
        bias=None if bias is None else bias.detach().clone(),
    )


def fake_quantize_rtn(
    w: torch.Tensor, bits: int, group_size: int, symmetric: bool, scale_dtype: torch.dtype = torch.float16
) -> torch.Tensor:
    """dequantize(quantize_rtn(w)) as float32 [out, in]: the search objective of AWQ. It runs once per AWQ candidate,
    so it goes the short way (no QTensor, no checks) with dequantize's arithmetic: the same values. A ragged last
    group is filled up with copies of its last column, which leave its min and max as they are, then cut off."""
    if w.dim() != 2 or group_size == 0 or group_size < -1:
        return dequantize(quantize_rtn(w, bits, group_size, symmetric, scale_dtype))  # its error message
    n = w.shape[1]
    gs = n if group_size == -1 else group_size
    wf = w.detach().float()
    pad = -n % gs
    if pad:
        wf = torch.cat([wf, wf[:, -1:].expand(-1, pad)], dim=1)
    wg = wf.reshape(w.shape[0], -1, gs)  # [out, G, gs]
    scale, zero = qparams(wg.amin(dim=2), wg.amax(dim=2), bits, symmetric, scale_dtype)  # [out, G]
    zero = None if zero is None else zero[..., None]
    codes = quantize_codes(wg, scale[..., None], zero, bits)
    z = 2.0 ** (bits - 1) if zero is None else zero.float()
    return ((codes.float() - z) * scale[..., None].float()).reshape(w.shape[0], -1)[:, :n]
