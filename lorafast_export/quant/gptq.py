"""GPTQ (Frantar et al. 2022): quantize one column at a time, pushing each column's rounding error onto
the columns not yet quantized through the Cholesky factor of the inverse Hessian H = 2/n · XᵀX.

Follows the reference IST-DASLab/gptq gptq.py `fasterquant` (lazy block updates, dead columns, damping,
act-order = columns in decreasing diag(H)). Two deliberate differences:
- group scales/zeros are computed from the weights AFTER the updates of all earlier columns (the block
  is aligned to the group size so that a group never straddles a lazy-update boundary; the reference
  uses not-yet-updated columns when a group starts mid-block);
- scales are rounded to `scale_dtype` before the codes are chosen, so the checkpoint is exact.
With act-order the groups are contiguous in the permuted order and `g_idx[c]` = position of column c in
that order // group_size, exactly GPTQ's g_idx (desc_act=True); codes are returned in original order.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from lorafast_export.errors import InputError
from lorafast_export.qform import QTensor, group_index
from lorafast_export.quant.rtn import check_quant_args, qparams, quantize_codes, weight_qtensor
from lorafast_export.quant.search import search_qparams

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RangeSearch:
    """Each group's range searched at its start (quant/search.py) instead of plain min-max."""

    grid: int = 100
    max_shrink: float = 0.8
    norm: float = 2.0
    hessian_weighted: bool = True  # weight each column's error by diag(H)


def accumulate_hessian(H: torch.Tensor | None, n_seen: int, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Running H = 2/n · Σ xᵀx in float32 over n tokens; x [..., in] (rows = tokens). Returns (H, n)."""
    x = x.detach().reshape(-1, x.shape[-1]).float()  # [tokens, in]
    t = x.shape[0]
    if H is None:
        H = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
    elif H.shape != (x.shape[1], x.shape[1]):
        raise InputError(f"accumulate_hessian: H {tuple(H.shape)} does not match input width {x.shape[1]}.")
    if t == 0:
        return H, n_seen
    n = n_seen + t
    H = H * (n_seen / n)
    x = x * (2.0 / n) ** 0.5
    return H.addmm_(x.T, x), n


def inverse_hessian_cholesky(H: torch.Tensor, damp_percent: float) -> torch.Tensor:
    """H [in, in] (dead columns set to 1) → upper Cholesky factor of (H + λI)⁻¹, λ = damp · mean diag(H)."""
    H = H.clone()
    damp = damp_percent * torch.mean(torch.diag(H))
    H.diagonal().add_(damp)
    L, info = torch.linalg.cholesky_ex(H)
    if info == 0:
        Hinv = torch.cholesky_inverse(L)
        U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
        if info == 0:
            return U
    raise InputError(
        f"GPTQ: the Hessian is not positive definite with damp_percent={damp_percent}. "
        "Increase damp_percent (e.g. 0.05 or 0.1) or calibrate with more tokens."
    )


def gptq_quantize(
    w: torch.Tensor,
    H: torch.Tensor,
    bits: int,
    group_size: int,
    symmetric: bool,
    act_order: bool = False,
    damp_percent: float = 0.01,
    block_size: int = 128,
    scale_dtype: torch.dtype = torch.float16,
    bias: torch.Tensor | None = None,
    search: RangeSearch | None = None,
    static_groups: bool = False,
) -> QTensor:
    """w [out, in], H [in, in] float32 (accumulate_hessian) → QTensor, codes in original column order."""
    return gptq_quantize_many(
        [w],
        H,
        bits,
        group_size,
        symmetric,
        act_order,
        damp_percent,
        block_size,
        scale_dtype,
        [bias],
        search,
        static_groups,
    )[0]


def gptq_quantize_many(
    weights: Sequence[torch.Tensor],
    H: torch.Tensor,
    bits: int,
    group_size: int,
    symmetric: bool,
    act_order: bool = False,
    damp_percent: float = 0.01,
    block_size: int = 128,
    scale_dtype: torch.dtype = torch.float16,
    biases: Sequence[torch.Tensor | None] | None = None,
    search: RangeSearch | None = None,
    static_groups: bool = False,
    refit: bool = False,
) -> list[QTensor]:
    """Linears that read one input (q/k/v; gate/up), each [out_i, in], and that input's H → one QTensor each.

    GPTQ treats rows independently given H, so the linears are quantized as one stacked [Σ out, in] matrix:
    one Cholesky inverse and one column sweep instead of one per linear, the same arithmetic row by row.
    static_groups: every group's scale / zero from the weights BEFORE the sweep (llm-compressor's way, AutoGPTQ's
    static_groups), not at the group's start from the updated ones; with act_order the groups stay contiguous
    in the original column order (no g_idx), so every target takes the result.
    refit: after the sweep, each group's scale re-solved for the codes it got (refit_scales); zero points and
    codes unchanged.
    """
    biases = list(biases) if biases is not None else [None] * len(weights)
    for w in weights:
        _check_gptq_args(w, H, bits, group_size, damp_percent, block_size, scale_dtype)
    W = torch.cat([w.detach().float() for w in weights])  # [Σ out, in], a fresh copy
    H = H.detach().float().clone()  # [in, in]
    dead = torch.diag(H) == 0  # inputs that never fire: their weights cannot matter
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    static = (
        _static_params(W, bits, group_size, symmetric, scale_dtype, search, torch.diag(H))
        if static_groups
        else None
    )
    W0, H0 = (W.clone(), H) if refit else (None, None)  # the sweep updates W in place
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else None
    if perm is not None:
        W, H = W[:, perm], H[perm][:, perm]
    with _ieee_fp32_matmuls(), _one_cpu_thread(W.device):  # float32 even inside the walk's TF32 context
        Hinv = inverse_hessian_cholesky(H, damp_percent)  # [in, in] upper
        if static is None:
            codes, scales, zeros = _gptq_sweep(
                W, Hinv, bits, group_size, symmetric, block_size, scale_dtype, search, torch.diag(H)
            )
        else:
            scales, zeros = static
            codes = _gptq_sweep_static(W, Hinv, bits, group_size, block_size, scales, zeros, perm)
    g_idx = None
    if perm is not None:
        inv = torch.argsort(perm)  # inv[c] = position of original column c in quantization order
        codes = codes[:, inv]
        if group_size != -1 and static is None:
            g_idx = (inv // group_size).to(torch.int32)
    if refit:
        with _ieee_fp32_matmuls():
            scales = refit_scales(W0, H0, codes, scales, zeros, bits, group_size, g_idx)
        del W0
    rows = [w.shape[0] for w in weights]
    zero_parts = [None] * len(rows) if zeros is None else zeros.split(rows)
    return [  # each QTensor owns its tensors: views of one storage would be saved as shared tensors
        weight_qtensor(c.clone(), s.clone(), _clone(z), bits, group_size, b, _clone(g_idx))
        for c, s, z, b in zip(codes.split(rows), scales.split(rows), zero_parts, biases, strict=True)
    ]


# refit_scales: float32 elements of one row chunk's [rows, groups, in] product (bounds its temporary)
REFIT_CHUNK_ELEMENTS = {"cpu": 1 << 23, "cuda": 1 << 27}


def refit_scales(
    W: torch.Tensor,
    H: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bits: int,
    group_size: int,
    g_idx: torch.Tensor | None = None,
) -> torch.Tensor:
    """Each group's scale re-solved for the codes GPTQ gave it: the scales [out, G] that minimise GPTQ's own
    objective, the calibration output error (W - Ŵ) H (W - Ŵ)ᵀ of each row, with the codes and the (integer) zero
    points fixed. Ŵ = s_g · (q - z_g) is linear in the row's G scales, so that is one G x G least-squares solve a
    row: A s = b with A[g, h] = Σ_{c in g, d in h} (q_c - z_g) H[c, d] (q_d - z_h) and b[g] = Σ_{c in g} (q_c - z_g)
    (H w)[c]. The scales are static (chosen before the sweep from min-max or a range search), so the codes the
    sweep picked, with their error feedback, usually fit a slightly different scale better.

    W [out, in] the weights before the sweep and H [in, in] the solve's Hessian (undamped), original column order;
    codes [out, in] uint8 in original order; g_idx [in] or None (contiguous groups). Returns scales in their dtype.
    A row keeps its old scales unless the new ones, rounded to that dtype, lower its objective; a group whose codes
    all sit on the zero point, or whose new scale is not finite or has changed sign (a symmetric scale carries the
    sign that puts the group's extreme on code -8), keeps its old scale."""
    out, n = W.shape
    G = scales.shape[1]
    gs = n if group_size == -1 else group_size
    order = None if g_idx is None else torch.argsort(g_idx, stable=True)
    if order is not None:  # act-order's groups, made contiguous (each group keeps its columns)
        W, H, codes = W[:, order], H[order][:, order], codes[:, order]
    gcol = group_index(n, group_size).to(W.device)  # [in]: contiguous groups now
    zf = torch.full_like(scales, 2.0 ** (bits - 1), dtype=torch.float32) if zeros is None else zeros.float()
    Qz = codes.float() - zf[:, gcol]  # [out, in]: Ŵ = s[:, gcol] * Qz
    HW = W @ H  # [out, in] (H symmetric)
    b = torch.zeros(out, G, dtype=torch.float64, device=W.device).index_add_(1, gcol, (Qz * HW).double())
    wHw = (HW.double() * W.double()).sum(1)  # [out]: each row's objective is wHw - 2 s.b + s.A s
    pad = G * gs - n  # a ragged last group: zero columns (no code, no H) up to G whole groups
    H4 = torch.nn.functional.pad(H, (0, pad, 0, pad)).view(G, gs, G * gs)
    budget = REFIT_CHUNK_ELEMENTS["cuda" if W.device.type == "cuda" else "cpu"]
    step = max(1, budget // (G * G * gs))  # rows at a time: A is never held for the whole matrix
    refit = torch.empty_like(scales)
    for r0 in range(0, out, step):
        rows = slice(r0, r0 + step)
        q = torch.nn.functional.pad(Qz[rows], (0, pad)).view(-1, G, gs)  # [rows, G, gs]
        R = torch.bmm(q.transpose(0, 1), H4).transpose(0, 1)  # [rows, G, G * gs]: Σ_k q[a, k] H[(a, k), m]
        A = torch.einsum("nabl,nbl->nab", R.reshape(-1, G, G, gs), q).double()
        del R
        refit[rows] = _refit_rows(A, b[rows], wHw[rows], scales[rows])
    return refit


def _refit_rows(A: torch.Tensor, b: torch.Tensor, wHw: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """refit_scales for a chunk of rows: A [rows, G, G], b [rows, G], wHw [rows] (float64), the old scales [rows, G]
    -> the scales each row keeps (new where they lower its objective, else old)."""
    s0 = scales.float()
    diag = A.diagonal(dim1=1, dim2=2)  # [rows, G]: 0 where a group's codes all sit on its zero point
    ridge = 1e-7 * diag.mean(dim=1, keepdim=True).clamp_min(1e-30)  # a touch toward the old scales
    Ar = A.clone()
    Ar.diagonal(dim1=1, dim2=2).add_(ridge)
    s_new, info = torch.linalg.solve_ex(Ar, b + ridge * s0.double())
    del Ar
    r = s_new.to(scales.dtype).float()  # as stored: rounding may overflow, or reach zero
    ok = (info == 0)[:, None] & (diag > 0) & torch.isfinite(r) & (r * s0 > 0)
    s_new = torch.where(ok, r.to(scales.dtype), scales)

    def objective(s: torch.Tensor) -> torch.Tensor:  # (w - Ŵ) H (w - Ŵ)ᵀ per row, from A and b (float64)
        s = s.double()
        return wHw - 2 * (s * b).sum(1) + (s[:, None, :] @ A @ s[:, :, None]).view(-1)

    better = objective(s_new) < objective(scales)
    return torch.where(better[:, None], s_new, scales)


def _clone(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.clone()


@contextmanager
def _one_cpu_thread(device: torch.device):
    """On the CPU, torch on one thread for the duration (the previous count is restored). The solve is
    thousands of small ops in sequence (one column at a time, [out, 128] updates): a second thread gains
    nothing on them and, when the other core is busy, every op waits for it at OpenMP's barrier. On the
    2-core machine with a loaded second core, one stacked gate/up sweep took 2.5 s of CPU on 2 threads
    against 0.2 s on one (bench/QUANT.md "CPU speed")."""
    before = torch.get_num_threads()
    if device.type == "cpu" and before > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


@contextmanager
def _ieee_fp32_matmuls():
    """float32 matmuls without TF32 for the duration; the previous setting is restored."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def _gptq_sweep(
    W: torch.Tensor,
    Hinv: torch.Tensor,
    bits: int,
    group_size: int,
    symmetric: bool,
    block_size: int,
    scale_dtype: torch.dtype,
    search: RangeSearch | None = None,
    hdiag: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The lazy-batched column sweep on W [out, in] (modified in place) → codes, scales, zeros.
    hdiag [in]: diag(H) in the sweep's column order (the range search's column weights)."""
    out, n = W.shape
    gs = n if group_size == -1 else group_size
    block = max(gs, block_size // gs * gs) if group_size != -1 else block_size  # groups never straddle
    sweep = _column_sweep(W)
    codes = torch.empty(out, n, dtype=torch.uint8, device=W.device)
    scale_list: list[torch.Tensor] = []
    zero_list: list[torch.Tensor | None] = []
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        W1 = W[:, i1:i2].clone()  # [out, b]
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for c0 in range(0, i2 - i1, gs):  # the groups inside this block (one per block when gs = block)
            if (i1 + c0) % gs == 0:  # a group starts: its params from the already-updated weights
                cols = W1[:, c0 : c0 + gs] if group_size != -1 else W  # per channel: the whole (initial) row
                s, z = _group_qparams(cols, bits, symmetric, scale_dtype, search, hdiag, i1 + c0)  # [out]
                scale_list.append(s)
                zero_list.append(z)
                sf, zf = s.float(), (2.0 ** (bits - 1) if z is None else z.float())
            sweep(W1, Hinv1, codes[:, i1:i2], Err1, c0, min(c0 + gs, i2 - i1), sf, z, zf, bits)
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]  # lazy update of the columns after this block
    scales = torch.stack(scale_list, dim=1)  # [out, G]
    zeros = None if symmetric else torch.stack(zero_list, dim=1)  # type: ignore[arg-type]
    return codes, scales, zeros


def _static_params(W, bits, group_size, symmetric, scale_dtype, search, hdiag):
    """Every group's (scale, zero) [out, G] from W [out, in] as it is before the sweep (original column order).
    With a range search, the whole groups are searched in one call (rows of every group stacked, each with its own
    columns' weights): the same choice per group as one call each, in far fewer GPU launches."""
    out, n = W.shape
    gs = n if group_size == -1 else group_size
    whole = n - n % gs if search is not None else 0  # columns searched at once (a ragged last group: alone)
    params = [
        _group_qparams(W[:, c : c + gs], bits, symmetric, scale_dtype, search, hdiag, c)
        for c in range(whole, n, gs)
    ]
    if whole:
        G = whole // gs
        rows = W[:, :whole].reshape(out, G, gs).transpose(0, 1).reshape(G * out, gs)  # group-major
        weight = None
        if search.hessian_weighted and hdiag is not None:
            weight = hdiag[:whole].reshape(G, 1, gs).expand(G, out, gs).reshape(G * out, gs)
        s, z = search_qparams(
            rows, bits, symmetric, scale_dtype, search.grid, search.max_shrink, search.norm, weight
        )
        params = [*zip(s.view(G, out), [None] * G if z is None else z.view(G, out)), *params]
    scales = torch.stack([p[0] for p in params], dim=1)
    return scales, None if symmetric else torch.stack([p[1] for p in params], dim=1)  # type: ignore[misc]


def _gptq_sweep_static(W, Hinv, bits, group_size, block_size, scales, zeros, perm) -> torch.Tensor:
    """The lazy-batched sweep on W [out, in] (sweep order; modified in place) with fixed group params
    scales / zeros [out, G] of the original column order; perm[j] = original column of sweep column j."""
    out, n = W.shape
    cols = torch.arange(n, device=W.device) if perm is None else perm
    g = cols // (n if group_size == -1 else group_size)  # [in] group of each sweep column
    sf = scales.float()[:, g]  # [out, in]
    z = None if zeros is None else zeros[:, g]
    zf = torch.full_like(sf, 2.0 ** (bits - 1)) if z is None else z.float()
    codes = torch.empty(out, n, dtype=torch.uint8, device=W.device)
    sweep = _column_sweep(W)
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        W1 = W[:, i1:i2].clone()  # [out, b]
        Err1 = torch.zeros_like(W1)
        sweep(
            W1,
            Hinv[i1:i2, i1:i2],
            codes[:, i1:i2],
            Err1,
            0,
            i2 - i1,
            sf[:, i1:i2],
            None if z is None else z[:, i1:i2],
            zf[:, i1:i2],
            bits,
        )
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return codes


def _group_qparams(cols, bits, symmetric, scale_dtype, search, hdiag, start):
    """cols [out, k] (a group of the updated weights) → (scale, zero) [out]: min-max, or searched."""
    if search is None:
        return qparams(cols.amin(dim=1), cols.amax(dim=1), bits, symmetric, scale_dtype)
    weight = hdiag[start : start + cols.shape[1]] if search.hessian_weighted and hdiag is not None else None
    return search_qparams(
        cols, bits, symmetric, scale_dtype, search.grid, search.max_shrink, search.norm, weight
    )


def _column_sweep(W: torch.Tensor):
    """The column sweep for W's device: the Triton kernel on CUDA where Triton is installed, else the torch loop."""
    return _sweep_columns_triton if W.is_cuda and _triton_sweep_kernel is not None else _sweep_columns


def _sweep_columns(W1, Hinv1, codes1, Err1, c0: int, c1: int, sf, z, zf, bits: int) -> None:
    """Columns c0..c1-1 of the block W1 [out, b], one at a time: quantize the column, push its error onto
    the columns after it (in place in W1; codes1 [out, b] and Err1 [out, b] get that column).
    sf / z / zf: the group's [out] (or a scalar zf), or one per column of the block [out, b]."""
    per_col = sf.dim() == 2
    for i in range(c0, c1):
        col = W1[:, i]  # [out]
        s_i, z_i, zf_i = (sf[:, i], None if z is None else z[:, i], zf[:, i]) if per_col else (sf, z, zf)
        q = quantize_codes(col, s_i, z_i, bits)  # [out]
        codes1[:, i] = q
        err = (col - (q.float() - zf_i) * s_i) / Hinv1[i, i]  # [out]
        W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
        Err1[:, i] = err


def _sweep_columns_triton(W1, Hinv1, codes1, Err1, c0: int, c1: int, sf, z, zf, bits: int) -> None:
    """_sweep_columns as one kernel: rows are independent, so each program holds a few rows of the block in
    registers and walks the columns; the same float32 operations in the same order (IEEE division,
    round-half-even, no fused multiply-add), so the codes equal the torch loop's on the same device.
    The group params are read per (row, column) through strides: a group's [out] has column stride 0, the
    static path's [out, b] (one group per column, act-order mixes them) its own.
    A kernel that fails to compile or launch here falls back to the torch loop (same codes), with a warning."""
    global _triton_sweep_kernel
    if _triton_sweep_kernel is None:  # an earlier launch failed
        return _sweep_columns(W1, Hinv1, codes1, Err1, c0, c1, sf, z, zf, bits)
    out, b = W1.shape
    zero = zf if torch.is_tensor(zf) else torch.full((out,), float(zf), device=W1.device)
    try:
        _launch_sweep(W1, Hinv1, codes1, Err1, c0, c1, sf, zero, bits)
    except Exception as e:  # noqa: BLE001 - it writes nothing before it runs: redo the columns in torch
        log.warning(
            "GPTQ's Triton column sweep failed (%s: %s); the torch loop runs instead", type(e).__name__, e
        )
        _triton_sweep_kernel = None
        _sweep_columns(W1, Hinv1, codes1, Err1, c0, c1, sf, z, zf, bits)


def _launch_sweep(W1, Hinv1, codes1, Err1, c0: int, c1: int, sf, zero, bits: int) -> None:
    out, b = W1.shape
    rows = 16
    _triton_sweep_kernel[(triton.cdiv(out, rows),)](
        W1,
        *W1.stride(),
        Hinv1,
        *Hinv1.stride(),
        codes1,
        *codes1.stride(),
        Err1,
        *Err1.stride(),
        sf,
        *_param_strides(sf),
        zero,
        *_param_strides(zero),
        out,
        b,
        c0,
        c1,
        float(2**bits - 1),
        ROWS=rows,
        WIDTH=triton.next_power_of_2(b),
        num_warps=4,
        enable_fp_fusion=False,
    )


def _param_strides(t: torch.Tensor) -> tuple[int, int]:
    """(row, column) strides of group params: [out] (one value per row for every column) or [out, b]."""
    return (t.stride(0), 0) if t.dim() == 1 else (t.stride(0), t.stride(1))


try:  # Triton comes with CUDA builds of torch; without it (CPU installs) the torch loop runs everywhere
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except ImportError:
    triton = None

if triton is None:
    _triton_sweep_kernel = None
else:

    @triton.jit
    def _triton_sweep_kernel(
        W,
        sw0,
        sw1,
        Hinv,
        sh0,
        sh1,
        codes,
        sc0,
        sc1,
        err,
        se0,
        se1,
        scale,
        ss0,
        ss1,
        zero,
        sz0,
        sz1,
        n_rows,
        width,
        c0,
        c1,
        maxq,
        ROWS: tl.constexpr,
        WIDTH: tl.constexpr,
    ):
        r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)  # [ROWS] rows of this program
        j = tl.arange(0, WIDTH)  # [WIDTH] columns of the block
        rmask = r < n_rows
        tile = rmask[:, None] & (j[None, :] < width)
        w_ptrs = W + r[:, None] * sw0 + j[None, :] * sw1
        w = tl.load(w_ptrs, mask=tile, other=0.0)  # [ROWS, WIDTH]
        for c in range(c0, c1):
            s = tl.load(scale + r * ss0 + c * ss1, mask=rmask, other=1.0)  # [ROWS] this column's group params
            z = tl.load(zero + r * sz0 + c * sz1, mask=rmask, other=0.0)
            col = tl.sum(tl.where(j[None, :] == c, w, 0.0), axis=1)  # [ROWS] column c, exactly
            q = tl.minimum(tl.maximum(libdevice.rint(tl.div_rn(col, s)) + z, 0.0), maxq)
            tl.store(codes + r * sc0 + c * sc1, q.to(tl.uint8), mask=rmask)
            e = tl.div_rn(col - (q - z) * s, tl.load(Hinv + c * sh0 + c * sh1))
            tl.store(err + r * se0 + c * se1, e, mask=rmask)
            h = tl.load(Hinv + c * sh0 + j * sh1, mask=(j >= c) & (j < width), other=0.0)  # row c, from c on
            w = w - e[:, None] * h[None, :]
        tl.store(w_ptrs, w, mask=tile)


def _check_gptq_args(
    w: torch.Tensor,
    H: torch.Tensor,
    bits: int,
    group_size: int,
    damp_percent: float,
    block_size: int,
    scale_dtype: torch.dtype,
) -> None:
    check_quant_args(w, bits, group_size, scale_dtype, where="gptq_quantize")
    problems = []
    if H.shape != (w.shape[1], w.shape[1]):
        problems.append(
            f"H {tuple(H.shape)} must be [in, in] = [{w.shape[1]}, {w.shape[1]}] for w "
            f"{tuple(w.shape)}; accumulate it from this linear's inputs"
        )
    elif not torch.isfinite(H).all():
        problems.append("H holds NaN or inf; check the calibration activations")
    if not 0.0 < damp_percent < 1.0:
        problems.append(f"damp_percent={damp_percent}: use a value in (0, 1), typically 0.01")
    if block_size <= 0:
        problems.append(f"block_size={block_size}: use a positive size such as 128")
    if problems:
        raise InputError("gptq_quantize: " + "; ".join(problems))
