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
- DEQUANT (plan kind 7, prefill-sized row counts): the codes dequantized once per call to a dense weight in
  x's dtype (`_dequant8_kernel`, BN rows x BK columns a program, as qform.dequantize computes it), then
  torch's matmul (cuBLAS). Our GEMMs ran at 0.45-0.5x bf16 at 1,024 rows on an H100 (session 35); this costs
  one pass over the codes (1 byte read, 2 written per weight) on top of the bf16 product.
Both split K (each split writes an fp32 partial, summed after). Plan entries, the row-bucket choice and
the jit wrapper are those of runtime/triton_int4.py. Under auto a measured int8 table picks them
(runtime/int4_table.int8_plan_from_table); `kernel=triton` forces them on any shape.

Triton is imported only here (CUDA, or its interpreter in tests). The op is a torch custom op: opaque to
inductor, captured in the step's CUDA graph.
"""

import torch
import triton
import triton.language as tl

from lorafast_export.runtime.triton_int4 import DEQUANT, GEMM_T, GEMV, _dot, _jit, pick, split_out, sum_splits


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


@triton.jit
def _by_n(v, SWAP: tl.constexpr):
    """A per-output-channel vector [BN] broadcast along the accumulator's N axis (its rows when SWAP)."""
    if SWAP:  # one return: Triton checks that every return has the same type, even under a constexpr
        r = v[:, None]
    else:
        r = v[None, :]
    return r


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
    IEEE: tl.constexpr,
    PER_CH: tl.constexpr,  # one group spans K
    SWAP: tl.constexpr,  # GEMM_T: swapped operands
):
    """GEMM: out [BM, BN] = x [BM, BK] @ W^T. GEMM_T (SWAP, as runtime/triton_int4.py's): out^T [BN, BM] =
    W [BN, BK] @ x^T [BK, BM], the weight rows as the MMA's M dimension. Per channel the scale multiplies
    the accumulator once at the end; with groups, each tile's partial sum."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    sp = tl.program_id(2)
    nn = pid_n * BN + tl.arange(0, BN)
    mm = pid_m * BM + tl.arange(0, BM)
    kk = tl.arange(0, BK)
    n_ok = nn < N
    m_ok = mm < M
    if SWAP:
        acc = tl.zeros([BN, BM], tl.float32)
        o_off, o_ok = (sp * M + mm[None, :]) * N + nn[:, None], m_ok[None, :] & n_ok[:, None]
    else:
        acc = tl.zeros([BM, BN], tl.float32)
        o_off, o_ok = (sp * M + mm[:, None]) * N + nn[None, :], m_ok[:, None] & n_ok[None, :]
    for it in range(0, ITERS):
        k0 = (sp * ITERS + it) * BK
        k_ok = k0 + kk < K
        w = tl.load(w_ptr + nn[:, None] * K + (k0 + kk)[None, :], mask=n_ok[:, None] & k_ok[None, :])
        g_off = nn * G + k0 // GS
        g_ok = n_ok & (k0 < K)
        if SWAP:
            b = tl.load(
                x_ptr + mm[None, :] * K + (k0 + kk)[:, None], mask=m_ok[None, :] & k_ok[:, None], other=0.0
            )
            a = _codes_minus_zero(w, z_ptr, g_off, g_ok, ASYM).to(b.dtype)  # exact integers in [-255, 255]
        else:
            a = tl.load(
                x_ptr + mm[:, None] * K + (k0 + kk)[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0
            )
            b = tl.trans(_codes_minus_zero(w, z_ptr, g_off, g_ok, ASYM).to(a.dtype))
        if PER_CH:
            acc = _dot(a, b, acc, IEEE)
        else:
            acc += _dot(a, b, None, IEEE) * _by_n(
                tl.load(s_ptr + g_off, mask=g_ok, other=0.0).to(tl.float32), SWAP
            )
    if PER_CH:
        acc = acc * _by_n(tl.load(s_ptr + nn * G, mask=n_ok, other=0.0).to(tl.float32), SWAP)
    tl.store(out_ptr + o_off, acc.to(out_ptr.dtype.element_ty), mask=o_ok)


@triton.jit
def _dequant8_kernel(
    w_ptr,  # [N, K] uint8 codes
    s_ptr,  # [N, G] scales
    z_ptr,  # [N, G] uint8 zero points (unused when symmetric)
    out_ptr,  # [N, K] in the activation dtype
    N,
    K,
    G,
    BN: tl.constexpr,
    BK: tl.constexpr,
    GS: tl.constexpr,  # group size (per channel: a power of two >= K)
    ASYM: tl.constexpr,
):
    """One tile (BN rows x BK columns) → (code - zero) * scale in fp32, as qform.dequantize computes it,
    stored in out's dtype."""
    nn = tl.program_id(0) * BN + tl.arange(0, BN)
    kk = tl.program_id(1) * BK + tl.arange(0, BK)
    ok = (nn < N)[:, None] & (kk < K)[None, :]
    g = nn[:, None] * G + kk[None, :] // GS
    c = tl.load(w_ptr + nn[:, None] * K + kk[None, :], mask=ok, other=0).to(tl.float32)
    s = tl.load(s_ptr + g, mask=ok, other=0.0).to(tl.float32)
    if ASYM:
        a = (c - tl.load(z_ptr + g, mask=ok, other=0).to(tl.float32)) * s
    else:
        a = (c - 128.0) * s
    tl.store(out_ptr + nn[:, None] * K + kk[None, :], a.to(out_ptr.dtype.element_ty), mask=ok)


def dequant8(
    w: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None, gs: int, bn: int, bk: int, warps: int, dtype
) -> torch.Tensor:
    """The dense [N, K] weight in dtype from the uint8 codes (DEQUANT's first step)."""
    (n, k), g = w.shape, s.shape[1]
    out = torch.empty(n, k, device=w.device, dtype=dtype)
    zp = z if z is not None else s  # never read when symmetric
    grid = (triton.cdiv(n, bn), triton.cdiv(k, bk))
    _dequant8_kernel[grid](w, s, zp, out, n, k, g, BN=bn, BK=bk, GS=gs, ASYM=z is not None, num_warps=warps)
    return out


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
    if kind == DEQUANT:
        return x @ dequant8(w, s, z, gs, bn, bk, warps, x.dtype).T
    bk = min(bk, gs)  # a tile lies inside one group (both powers of two)
    iters, splits, out = split_out(x, n, triton.cdiv(k, bk), splits)
    zp = z if z is not None else s  # never read when symmetric
    args = (x, w, s, zp, out, m, n, k, g)
    common = dict(ITERS=iters, BN=bn, BK=bk, GS=gs, ASYM=z is not None, num_warps=warps)
    if kind == GEMV:
        _gemv8_kernel[(triton.cdiv(n, bn), splits)](*args, MP=triton.next_power_of_2(m), **common)
    else:
        grid = (triton.cdiv(n, bn), triton.cdiv(m, bm), splits)
        opt = dict(IEEE=x.dtype == torch.float32, PER_CH=gs >= k, SWAP=kind == GEMM_T)
        _gemm8_kernel[grid](*args, BM=bm, **opt, **common)
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
