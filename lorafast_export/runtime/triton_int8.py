"""int8 weight-only matmuls as Triton kernels that read the quantized form's int8 codes in place.

Weights stay as qform stores them: uint8 codes [out, in], scales [out, groups] in their stored dtype
(one group = per channel), zero points uint8 [out, groups] or none (symmetric: zero 128);
w = (code - zero) * scale. A tile spans BK input columns inside one group, so its scale multiplies the
tile's partial sum once; per weight the work is one OR and one float subtraction.
- GEMV for a few rows: no tensor cores; products summed over the tile in fp32, one row at a time.
- GEMM for more rows: (code - zero) lies in [-255, 255], exact in bf16/fp16, and goes to tl.dot.
- GEMM_T (plan kind 4): the GEMM with swapped operands, the weight rows as the MMA's M dimension (Hopper's
  wgmma wants 64 per warpgroup), per-channel scales applied once after the loop.
Codes become floats by a bit trick (`_codes_minus_zero`), not an int-to-float conversion.
Both split K (each split writes an fp32 partial, summed after). Plan entries, the row-bucket choice and
the jit wrapper are those of runtime/triton_int4.py. There is no measured table for int8 yet: only
`kernel=triton` selects these kernels (auto keeps int8 dequantized on CUDA).

Triton is imported only here (CUDA, or its interpreter in tests). The op is a torch custom op: opaque to
inductor, captured in the step's CUDA graph.
"""

import torch
import triton
import triton.language as tl

from lorafast_export.runtime.triton_int4 import GEMM_T, GEMV, _jit, pick, sum_splits


@triton.jit
def _codes_minus_zero(w, z_ptr, g_off, g_ok, ASYM: tl.constexpr):
    """uint8 codes [R, C] → fp32 code - zero, exact, without an int-to-float conversion (quarter rate on
    Hopper): code | 0x4B000000, read as fp32, is 2**23 + code."""
    big = (w.to(tl.int32) | 0x4B000000).to(tl.float32, bitcast=True)
    if ASYM:
        z = tl.load(z_ptr + g_off, mask=g_ok, other=0).to(tl.int32)
        return big - (z | 0x4B000000).to(tl.float32, bitcast=True)[:, None]
    return big - 8388736.0  # 2**23 + 128


@_jit
def _gemv8_kernel(
    x_ptr,  # [M, K] activations
    w_ptr,  # [N, K] uint8 codes
    s_ptr,  # [N, G] scales
    z_ptr,  # [N, G] uint8 zero points (unused when symmetric)
    out_ptr,  # [SPLITS, M, N] fp32 partials, or [M, N] in x's dtype with one split
    M,
    N,
    K,
    G,
    ITERS: tl.constexpr,  # tiles per split
    MP: tl.constexpr,  # M padded to a power of two
    BN: tl.constexpr,
    BK: tl.constexpr,  # divides GS
    GS: tl.constexpr,  # group size (per channel: a power of two >= K)
    ASYM: tl.constexpr,
):
    pid_n = tl.program_id(0)
    sp = tl.program_id(1)
    nn = pid_n * BN + tl.arange(0, BN)
    mm = tl.arange(0, MP)
    kk = tl.arange(0, BK)
    n_ok = nn < N
    acc = tl.zeros([MP, BN], tl.float32)
    for it in range(0, ITERS):
        k0 = (sp * ITERS + it) * BK  # tiles past K load nothing (masked)
        w = tl.load(w_ptr + nn[:, None] * K + (k0 + kk)[None, :], mask=n_ok[:, None] & (k0 + kk < K)[None, :])
        g_off = nn * G + k0 // GS
        g_ok = n_ok & (k0 < K)
        s = tl.load(s_ptr + g_off, mask=g_ok, other=0.0).to(tl.float32)  # [BN]
        wf = _codes_minus_zero(w, z_ptr, g_off, g_ok, ASYM)  # [BN, BK] fp32
        for m in tl.static_range(MP):
            x = tl.load(x_ptr + m * K + k0 + kk, mask=(k0 + kk < K) & (m < M), other=0.0).to(tl.float32)
            part = tl.sum(wf * x[None, :], axis=1) * s  # [BN]
            acc += tl.where(mm[:, None] == m, part[None, :], 0.0)
    o_off = (sp * M + mm[:, None]) * N + nn[None, :]
    tl.store(out_ptr + o_off, acc.to(out_ptr.dtype.element_ty), mask=(mm < M)[:, None] & n_ok[None, :])


@_jit
def _gemm8_kernel(
    x_ptr,  # [M, K]
    w_ptr,  # [N, K] uint8
    s_ptr,  # [N, G]
    z_ptr,  # [N, G] uint8
    out_ptr,  # [SPLITS, M, N] fp32, or [M, N] in x's dtype
    M,
    N,
    K,
    G,
    ITERS: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,  # divides GS
    GS: tl.constexpr,
    ASYM: tl.constexpr,
    IEEE: tl.constexpr,  # fp32 activations: exact fp32 dots (the default rounds inputs to tf32)
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    sp = tl.program_id(2)
    mm = pid_m * BM + tl.arange(0, BM)
    nn = pid_n * BN + tl.arange(0, BN)
    kk = tl.arange(0, BK)
    n_ok = nn < N
    m_ok = mm < M
    acc = tl.zeros([BM, BN], tl.float32)
    for it in range(0, ITERS):
        k0 = (sp * ITERS + it) * BK
        k_ok = k0 + kk < K
        w = tl.load(w_ptr + nn[:, None] * K + (k0 + kk)[None, :], mask=n_ok[:, None] & k_ok[None, :])
        x = tl.load(
            x_ptr + mm[:, None] * K + (k0 + kk)[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0
        )
        g_off = nn * G + k0 // GS
        g_ok = n_ok & (k0 < K)
        s = tl.load(s_ptr + g_off, mask=g_ok, other=0.0).to(tl.float32)  # [BN]
        if ASYM:
            z = tl.load(z_ptr + g_off, mask=g_ok, other=0).to(tl.int16)[:, None]
        else:
            z = 128
        wq = (w.to(tl.int16) - z).to(x.dtype)  # [BN, BK], exact integers in [-255, 255]
        if IEEE:
            part = tl.dot(x, tl.trans(wq), input_precision="ieee")
        else:
            part = tl.dot(x, tl.trans(wq))
        acc += part * s[None, :]
    o_off = (sp * M + mm[:, None]) * N + nn[None, :]
    tl.store(out_ptr + o_off, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@_jit
def _gemm8_t_kernel(
    x_ptr,  # [M, K]
    w_ptr,  # [N, K] uint8
    s_ptr,  # [N, G]
    z_ptr,  # [N, G] uint8
    out_ptr,  # [SPLITS, M, N] fp32, or [M, N] in x's dtype
    M,
    N,
    K,
    G,
    ITERS: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,  # divides GS
    GS: tl.constexpr,
    ASYM: tl.constexpr,
    IEEE: tl.constexpr,
    PER_CH: tl.constexpr,  # one group spans K
):
    """Swapped operands (as runtime/triton_int4.py's GEMM_T): out^T [BN, BM] = W [BN, BK] @ x^T [BK, BM],
    the weight rows as the MMA's M dimension. Per channel (one group, GS >= K) the scale multiplies the
    accumulator once at the end; with groups, each tile's partial sum."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    sp = tl.program_id(2)
    nn = pid_n * BN + tl.arange(0, BN)
    mm = pid_m * BM + tl.arange(0, BM)
    kk = tl.arange(0, BK)
    n_ok = nn < N
    m_ok = mm < M
    acc = tl.zeros([BN, BM], tl.float32)
    for it in range(0, ITERS):
        k0 = (sp * ITERS + it) * BK
        k_ok = k0 + kk < K
        w = tl.load(w_ptr + nn[:, None] * K + (k0 + kk)[None, :], mask=n_ok[:, None] & k_ok[None, :])
        x = tl.load(
            x_ptr + mm[None, :] * K + (k0 + kk)[:, None], mask=m_ok[None, :] & k_ok[:, None], other=0.0
        )
        g_off = nn * G + k0 // GS
        g_ok = n_ok & (k0 < K)
        wq = _codes_minus_zero(w, z_ptr, g_off, g_ok, ASYM).to(x.dtype)  # exact integers in [-255, 255]
        if PER_CH:
            if IEEE:
                acc = tl.dot(wq, x, acc, input_precision="ieee")
            else:
                acc = tl.dot(wq, x, acc)
        else:
            if IEEE:
                part = tl.dot(wq, x, input_precision="ieee")
            else:
                part = tl.dot(wq, x)
            acc += part * tl.load(s_ptr + g_off, mask=g_ok, other=0.0).to(tl.float32)[:, None]
    if PER_CH:
        acc = acc * tl.load(s_ptr + nn * G, mask=n_ok, other=0.0).to(tl.float32)[:, None]
    o_off = (sp * M + mm[None, :]) * N + nn[:, None]
    tl.store(out_ptr + o_off, acc.to(out_ptr.dtype.element_ty), mask=m_ok[None, :] & n_ok[:, None])


def launch8(
    x: torch.Tensor,
    w: torch.Tensor,
    s: torch.Tensor,
    z: torch.Tensor | None,
    group_size: int,
    entry: list[int] | tuple[int, ...],
) -> torch.Tensor:
    """x [M, K] @ dequant(w).T with one plan entry (runtime/triton_int4.ENTRY) → [M, N] in x's dtype.
    group_size -1 (or >= K): one scale per output channel."""
    _, kind, bn, bk, splits, bm, warps = entry
    m, (n, k), g = x.shape[0], w.shape, s.shape[1]
    gs = triton.next_power_of_2(k) if group_size == -1 or group_size >= k else group_size
    bk = min(bk, gs)  # a tile lies inside one group (both powers of two)
    tiles = triton.cdiv(k, bk)
    iters = triton.cdiv(tiles, splits)
    splits = triton.cdiv(tiles, iters)  # splits that hold columns
    out = (
        torch.empty(m, n, device=x.device, dtype=x.dtype)
        if splits == 1
        else torch.empty(splits, m, n, device=x.device, dtype=torch.float32)
    )
    zp = z if z is not None else s  # never read when symmetric
    args = (x, w, s, zp, out, m, n, k, g)
    common = dict(ITERS=iters, BN=bn, BK=bk, GS=gs, ASYM=z is not None, num_warps=warps)
    if kind == GEMV:
        _gemv8_kernel[(triton.cdiv(n, bn), splits)](*args, MP=triton.next_power_of_2(m), **common)
    elif kind == GEMM_T:
        grid = (triton.cdiv(n, bn), triton.cdiv(m, bm), splits)
        _gemm8_t_kernel[grid](*args, BM=bm, IEEE=x.dtype == torch.float32, PER_CH=gs >= k, **common)
    else:
        grid = (triton.cdiv(m, bm), triton.cdiv(n, bn), splits)
        _gemm8_kernel[grid](*args, BM=bm, IEEE=x.dtype == torch.float32, **common)
    return out if splits == 1 else sum_splits(out, x.dtype)


@torch.library.custom_op("lorafast::int8_mm", mutates_args=())
def int8_mm(
    x: torch.Tensor,
    w: torch.Tensor,
    s: torch.Tensor,
    z: torch.Tensor | None,
    group_size: int,
    plan: list[int],
) -> torch.Tensor:
    """x [M, K] → [M, N] with the kernel the plan gives for M rows (chosen inside the op, so a compiled
    graph does not branch on the dynamic row count)."""
    return launch8(x.contiguous(), w, s, z, group_size, pick(plan, x.shape[0]))


@int8_mm.register_fake
def _(x, w, s, z, group_size, plan):
    return x.new_empty(x.shape[0], w.shape[0])
