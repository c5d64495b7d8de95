"""Fused decode kernels for the dense (bf16/fp16) layers at a few rows: a decode step at batch 1-8 and a
speculative verify of up to 8 tokens (runtime option `fused_decode`).

At batch 1 an 8B decode step ran about 16 kernels a layer (bench/TORCH.md, session 10): four cuBLAS products
and two split-K reduces around a dozen small inductor kernels (residual adds, RMSNorms, silu-mul) of 1-5 us
each. Here each product carries its neighbours, so a layer is four GEMVs plus rope, the k/v write and the
attention:

- `add_norm_gemv`: x = h + delta (the previous layer's two parts), RMSNorm(x) and x_norm @ W^T (qkv_proj;
  the final norm and the lm_head); x is written out once (the residual stream).
- `gemv_add`: r + a @ W^T (o_proj and its residual add).
- `norm_glu`: RMSNorm(x), then gate and up rows of the fused gate_up weight in one program and
  silu(gate) * up (the MLP's first half: the [rows, 2 x intermediate] product is never written).
- `fused_gemv`: a @ W^T alone (down_proj: its output is the next layer's delta).

The RMSNorm is folded into the product, in one pass over the row: y = rsqrt(mean(x^2) + eps) * ((x * w_norm)
@ W^T), all in float32. The plain step rounds the normalized row to the activation dtype twice before its
product; this is the same function without those two roundings (closer to the float32 product, not equal to
the plain step bit for bit). h + delta and each product are rounded where the plain step rounds them;
silu(gate) * up is computed in float32 from the rounded gate and up and rounded once (as inductor's fused
kernel does). Each program owns one row and BN output columns over the whole K (no split-K) and every program
of a row recomputes its sum of squares (the row comes from L2): row i of an 8-row call is computed by the same
operations as the 1-row call, bit for bit, which a speculative verify needs. Several rows are several programs
reading the same weight tile (from L2): a 4-row call took 1.7-2.5x a 1-row call on the H200 (bench/TORCH.md),
so a runtime without a draft runs them at one row only (paged.use_fused_decode).

Triton is imported only here (CUDA, or its interpreter in tests: TRITON_INTERPRET=1 before the import).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lorafast_export.runtime.triton_attention import pdl_start

MAX_ROWS = 8  # rows one call takes (a decode step at batch <= 8, a verify of <= 8 tokens)


@triton.jit
def _act(x_ptr, d_ptr, nw_ptr, xo_ptr, m, K, kk, write, dt: tl.constexpr, ADD_IN: tl.constexpr,
         NORM: tl.constexpr, EVEN: tl.constexpr):  # fmt: skip
    """Columns kk of activation row m, in float32, as the product reads them: x (ADD_IN: x + d, rounded to dt
    as the plain step's residual add, and stored at xo where `write`), times the RMSNorm weight (NORM); and the
    squares of the unscaled values (the norm's sum of squares, taken in the same pass)."""
    if EVEN:
        xv = tl.load(x_ptr + m * K + kk)
    else:
        xv = tl.load(x_ptr + m * K + kk, mask=kk < K, other=0.0)
    if ADD_IN:
        if EVEN:
            dv = tl.load(d_ptr + m * K + kk)
        else:
            dv = tl.load(d_ptr + m * K + kk, mask=kk < K, other=0.0)
        xv = (xv.to(tl.float32) + dv.to(tl.float32)).to(dt)
        if write:
            tl.store(xo_ptr + m * K + kk, xv, mask=kk < K)
    xf = xv.to(tl.float32)
    sq = xf * xf
    if NORM:
        if EVEN:
            nw = tl.load(nw_ptr + kk)
        else:
            nw = tl.load(nw_ptr + kk, mask=kk < K, other=0.0)
        xf = xf * nw.to(tl.float32)
    return xf, sq


@triton.jit
def _fused_kernel(
    x_ptr,  # [M, K] input rows
    d_ptr,  # [M, K] added to x first (ADD_IN)
    nw_ptr,  # [K] RMSNorm weight (NORM)
    w_ptr,  # [N (x 2 with GLU), K] row-major weight
    r_ptr,  # [M, N] residual added to the output (ADD_OUT)
    y_ptr,  # [M, N] output
    xo_ptr,  # [M, K] x + d written here by the programs of column block 0 (ADD_IN)
    b_ptr,  # [N] bias added to the product (BIAS)
    cos_ptr,  # [M, D] rope's cos and sin at each row's position (ROPE)
    sin_ptr,
    kp_ptr,  # [HKV, slots, D] the layer's k and v pools (ROPE): k and v are written at the row's slot
    vp_ptr,
    slot_ptr,  # [M] int64
    pool_stride,  # slots x D: one kv head of a pool
    M,
    N,
    K,
    eps,
    ITERS: tl.constexpr,  # cdiv(K, BK)
    BN: tl.constexpr,
    BK: tl.constexpr,
    ADD_IN: tl.constexpr,
    NORM: tl.constexpr,
    GLU: tl.constexpr,  # up rows are rows N.. of w; output silu(gate) * up
    ADD_OUT: tl.constexpr,
    BIAS: tl.constexpr,
    ROPE: tl.constexpr,  # w is [q; k; v] heads of D rows: BN column pairs (c, c + D/2), rope on q and k
    D: tl.constexpr,  # head dim (ROPE)
    QN: tl.constexpr,  # q's columns (ROPE); k's are QN..QN+KN, v's the rest
    KN: tl.constexpr,
    EVEN: tl.constexpr,  # N % BN == 0 and K % BK == 0 (ROPE: N / 2 % BN): no masks
    PDL: tl.constexpr,  # launched as a programmatic dependent launch (pdl_launch)
    PF: tl.constexpr,  # PDL only: L2 prefetch pieces of this program's weight rows, one a thread (0: none)
    piece,  # bytes a piece (PF)
):
    # one grid axis (the second is limited to 65,535 blocks: a 128k-vocabulary lm_head at BN = 1 exceeds it);
    # the programs of one weight tile (its rows of x) are consecutive, so the tile read for row 0 is in L2
    m = tl.program_id(0) % M
    j = tl.program_id(0) // M
    dt = y_ptr.dtype.element_ty
    rn, r2, nmask = _columns(j, BN, N, ROPE, D)
    rk = tl.arange(0, BK)
    # PDL: weights only before the wait, the previous kernel may still be writing this one's inputs; rows rn (and
    # r2) are BN consecutive weight rows each, asked for once: the other rows' programs find them in L2
    if PF > 0:
        if m == 0:
            _l2_prefetch(w_ptr + tl.min(rn, 0).to(tl.int64) * K, piece, PF)
            if GLU or ROPE:
                _l2_prefetch(w_ptr + tl.min(r2, 0).to(tl.int64) * K, piece, PF)
    pdl_start(PDL, False)
    acc = tl.zeros([BN, BK], tl.float32)
    if GLU or ROPE:
        acc2 = tl.zeros([BN, BK], tl.float32)
    if NORM:
        ss = tl.zeros([BK], tl.float32)
    for it in range(0, ITERS):
        kk = it * BK + rk
        xf, sq = _act(x_ptr, d_ptr, nw_ptr, xo_ptr, m, K, kk, j == 0, dt, ADD_IN, NORM, EVEN)
        if NORM:
            ss += sq
        if EVEN:
            w = tl.load(w_ptr + rn[:, None] * K + kk[None, :])
        else:
            w = tl.load(
                w_ptr + rn[:, None] * K + kk[None, :], mask=nmask[:, None] & (kk < K)[None, :], other=0.0
            )
        acc += w.to(tl.float32) * xf[None, :]
        if GLU or ROPE:
            if EVEN:
                w2 = tl.load(w_ptr + r2[:, None] * K + kk[None, :])
            else:
                w2 = tl.load(
                    w_ptr + r2[:, None] * K + kk[None, :],
                    mask=nmask[:, None] & (kk < K)[None, :],
                    other=0.0,
                )
            acc2 += w2.to(tl.float32) * xf[None, :]
    y = tl.sum(acc, 1)
    inv = y  # unused unless NORM
    if NORM:  # RMSNorm's 1 / sqrt(mean(x^2) + eps), applied to the product
        inv = 1.0 / tl.sqrt(tl.sum(ss, 0) / K + eps)
    y2 = y  # unused unless GLU or ROPE
    if GLU or ROPE:
        y2 = tl.sum(acc2, 1)
    _epilogue(
        y, y2, inv, m, rn, r2, nmask, y_ptr, r_ptr, b_ptr, cos_ptr, sin_ptr, kp_ptr, vp_ptr, slot_ptr,
        pool_stride, N, NORM, GLU, ADD_OUT, BIAS, ROPE, D, QN, KN,
    )  # fmt: skip


@triton.jit
def _columns(j, BN: tl.constexpr, N, ROPE: tl.constexpr, D: tl.constexpr):
    """Column block j's output columns rn, their partners r2 and which exist: rope's pair p is columns
    (p // (D/2)) * D + p % (D/2) and D/2 further, the two halves rope mixes; otherwise r2 = rn + N (GLU: the up
    row of gate row rn)."""
    rn = j * BN + tl.arange(0, BN)
    if ROPE:
        nmask = rn < N // 2
        rn = (rn // (D // 2)) * D + rn % (D // 2)
        r2 = rn + D // 2
    else:
        nmask = rn < N
        r2 = rn + N
    return rn, r2, nmask


@triton.jit
def _l2_prefetch(ptr, piece, PF: tl.constexpr):
    """PF bulk L2 prefetches of `piece` bytes each, from ptr on (16-byte aligned, piece a multiple of 16; sm90+),
    one a thread; they return at once: the loads that follow find the bytes in L2."""
    p = ptr.to(tl.pointer_type(tl.int8), bitcast=True) + tl.arange(0, PF).to(tl.int64) * piece
    tl.inline_asm_elementwise(
        "cp.async.bulk.prefetch.L2.global [$1], $2; // $0",
        "=r,l,r",
        [p, tl.full([PF], piece, tl.int32)],
        dtype=tl.int32,
        is_pure=False,
        pack=1,
    )


@triton.jit
def _epilogue(
    y,  # [BN] fp32 product of columns rn (before the norm's 1 / rms)
    y2,  # [BN] fp32 product of columns r2 (GLU: the up rows; ROPE: the pair's second half)
    inv,  # RMSNorm's 1 / rms (NORM)
    m,
    rn,
    r2,
    nmask,
    y_ptr,
    r_ptr,
    b_ptr,
    cos_ptr,
    sin_ptr,
    kp_ptr,
    vp_ptr,
    slot_ptr,
    pool_stride,
    N,
    NORM: tl.constexpr,
    GLU: tl.constexpr,
    ADD_OUT: tl.constexpr,
    BIAS: tl.constexpr,
    ROPE: tl.constexpr,
    D: tl.constexpr,
    QN: tl.constexpr,
    KN: tl.constexpr,
):
    """The fused kernels' common end (this module's and runtime/triton_fused_int4.py's): the norm, the bias,
    rope and the k/v write, or silu(gate) * up, the residual add; each rounding where the plain step rounds."""
    dt = y_ptr.dtype.element_ty
    if NORM:
        y = y * inv
    if BIAS:  # added before the product is rounded (as cuBLAS's epilogue in the plain step's linear)
        y = y + tl.load(b_ptr + rn, mask=nmask, other=0.0).to(tl.float32)
    if ROPE:
        if NORM:
            y2 = y2 * inv
        if BIAS:
            y2 = y2 + tl.load(b_ptr + r2, mask=nmask, other=0.0).to(tl.float32)
        lo = y.to(dt).to(tl.float32)  # the qkv product as the plain step rounds it
        hi = y2.to(dt).to(tl.float32)
        i = rn % D
        c1 = tl.load(cos_ptr + m * D + i, mask=nmask, other=0.0).to(tl.float32)
        s1 = tl.load(sin_ptr + m * D + i, mask=nmask, other=0.0).to(tl.float32)
        c2 = tl.load(cos_ptr + m * D + i + D // 2, mask=nmask, other=0.0).to(tl.float32)
        s2 = tl.load(sin_ptr + m * D + i + D // 2, mask=nmask, other=0.0).to(tl.float32)
        is_v = rn >= QN + KN  # x * cos + rotate_half(x) * sin on q and k; v as it is
        o1 = tl.where(is_v, lo, lo * c1 - hi * s1).to(dt)
        o2 = tl.where(is_v, hi, hi * c2 + lo * s2).to(dt)
        tl.store(y_ptr + m * QN + rn, o1, mask=nmask & (rn < QN))
        tl.store(y_ptr + m * QN + r2, o2, mask=nmask & (rn < QN))
        slot = tl.load(slot_ptr + m)
        kc = rn - QN  # the column within k, within v
        vc = rn - QN - KN
        kv_k = (kc // D) * pool_stride + slot * D + kc % D
        kv_v = (vc // D) * pool_stride + slot * D + vc % D
        is_k = (rn >= QN) & ~is_v
        tl.store(kp_ptr + kv_k, o1, mask=nmask & is_k)
        tl.store(kp_ptr + kv_k + D // 2, o2, mask=nmask & is_k)
        tl.store(vp_ptr + kv_v, o1, mask=nmask & is_v)
        tl.store(vp_ptr + kv_v + D // 2, o2, mask=nmask & is_v)
    else:
        if GLU:
            g = y.to(dt).to(tl.float32)
            u = y2
            if NORM:
                u = u * inv
            u = u.to(dt).to(tl.float32)
            y = g * tl.sigmoid(g) * u
        if ADD_OUT:
            r = tl.load(r_ptr + m * N + rn, mask=nmask, other=0.0)
            y = y.to(dt).to(tl.float32) + r.to(tl.float32)
        tl.store(y_ptr + m * N + rn, y.to(dt), mask=nmask)


@triton.jit
def _mma_block(x_ptr, d_ptr, nw_ptr, w_ptr, xo_ptr, rn, nmask, rm, mmask, rk, K, write, acc, ss,
               ADD_IN: tl.constexpr, NORM: tl.constexpr, PREC: tl.constexpr):  # fmt: skip
    """The tensor-core kernels' step over columns rk of K: the activation operand x^T [BK, BM] (ADD_IN: x + d
    rounded as the plain step's residual add, stored at xo where `write`), its squares added to ss and the RMSNorm
    weight applied (NORM), rounded to the weight's dtype, times weight rows rn (those of nmask) into acc."""
    xm = mmask[None, :] & (rk < K)[:, None]
    xv = tl.load(x_ptr + rm[None, :] * K + rk[:, None], mask=xm, other=0.0)  # [BK, BM]: x^T
    if ADD_IN:
        dv = tl.load(d_ptr + rm[None, :] * K + rk[:, None], mask=xm, other=0.0)
        xv = (xv.to(tl.float32) + dv.to(tl.float32)).to(xo_ptr.dtype.element_ty)
        if write:
            tl.store(xo_ptr + rm[None, :] * K + rk[:, None], xv, mask=xm)
    xf = xv.to(tl.float32)
    if NORM:
        ss += tl.sum(xf * xf, 0)
        xf = xf * tl.load(nw_ptr + rk, mask=rk < K, other=0.0).to(tl.float32)[:, None]
    w = tl.load(w_ptr + rn[:, None].to(tl.int64) * K + rk[None, :], mask=nmask[:, None] & (rk < K)[None, :],
                other=0.0)  # fmt: skip
    return tl.dot(w, xf.to(w_ptr.dtype.element_ty), acc, input_precision=PREC), ss


@triton.jit
def _mma_partial_kernel(
    x_ptr,  # [M, K] input rows
    d_ptr,  # [M, K] added to x first (ADD_IN)
    nw_ptr,  # [K] RMSNorm weight (NORM)
    w_ptr,  # [NW, K] row-major weight (all of its rows: GLU's gate and up, rope's q, k and v)
    p_ptr,  # [SPLIT, M, NW] float32 partial products
    ss_ptr,  # [SPLIT, M] float32 partial sums of squares of x (NORM)
    xo_ptr,  # [M, K] x + d written here by the programs of column block 0 (ADD_IN)
    M,
    NW,
    K,
    KS: tl.constexpr,  # K a split: a multiple of BK
    BN: tl.constexpr,
    BK: tl.constexpr,
    BM: tl.constexpr,  # 16: the rows' tile, whatever M (<= BM) is
    ADD_IN: tl.constexpr,
    NORM: tl.constexpr,
    PREC: tl.constexpr,  # tl.dot's input precision: "ieee" for float32 weights (no tf32 rounding)
):
    """Split s's partial products of BN weight rows with the M activation rows on the tensor cores (tl.dot: the
    weight rows in the MMA's M, the activation rows, padded to BM, in its N). The activation operand is x (ADD_IN:
    x + d rounded as the plain step's residual add), times the RMSNorm weight (NORM), rounded to the weight's
    dtype; float32 accumulation in a fixed k order. Rows past M are zeros and an MMA's columns are independent, so
    row m's partials are the same whatever M is: row i of any call is the 1-row call, bit for bit."""
    pn = tl.program_id(0)
    s = tl.program_id(1)
    rn = pn * BN + tl.arange(0, BN)
    rm = tl.arange(0, BM)
    mmask = rm < M
    acc = tl.zeros([BN, BM], tl.float32)
    ss = tl.zeros([BM], tl.float32)
    for kb in range(0, KS, BK):
        rk = s * KS + kb + tl.arange(0, BK)
        acc, ss = _mma_block(x_ptr, d_ptr, nw_ptr, w_ptr, xo_ptr, rn, rn < NW, rm, mmask, rk, K, pn == 0, acc, ss,
                             ADD_IN, NORM, PREC)  # fmt: skip
    tl.store(p_ptr + (s * M + rm[None, :]) * NW + rn[:, None], acc, mask=(rn < NW)[:, None] & mmask[None, :])
    if NORM:
        if pn == 0:
            tl.store(ss_ptr + s * M + rm, ss, mask=mmask)


@triton.jit
def _mma_one_kernel(
    x_ptr,  # [M, K] input rows
    d_ptr,  # [M, K] added to x first (ADD_IN)
    nw_ptr,  # [K] RMSNorm weight (NORM)
    w_ptr,  # [N, K] row-major weight
    r_ptr,  # [M, N] residual added to the output (ADD_OUT)
    y_ptr,  # [M, N] output
    xo_ptr,  # [M, K] x + d written here by the program of column block 0 (ADD_IN)
    b_ptr,  # the epilogue's (as _fused_kernel's)
    cos_ptr,
    sin_ptr,
    kp_ptr,
    vp_ptr,
    slot_ptr,
    pool_stride,
    M,
    N,
    K,
    eps,
    ITERS: tl.constexpr,  # cdiv(K, BK)
    BN: tl.constexpr,
    BK: tl.constexpr,
    BM: tl.constexpr,  # 16: the rows' tile, whatever M (<= BM) is
    ADD_IN: tl.constexpr,
    NORM: tl.constexpr,
    GLU: tl.constexpr,
    ADD_OUT: tl.constexpr,
    BIAS: tl.constexpr,
    ROPE: tl.constexpr,
    D: tl.constexpr,
    QN: tl.constexpr,
    KN: tl.constexpr,
    PREC: tl.constexpr,
):
    """A plain tensor-core op of one split (no GLU or rope pairs) in one kernel: program j owns output columns j,
    runs _mma_partial_kernel's products and sum of squares over the whole K, then the epilogue itself (no partials
    written, no finishing kernel). Row m's arithmetic is the two-kernel path's with SPLIT = 1 (whose finish adds
    the one partial to 0), and rows are an MMA's independent columns: row i of any call is the 1-row call, bit
    for bit. (With pairs a program would own twice the weight rows, and an op half the programs: slower.)"""
    tl.static_assert(not GLU and not ROPE)
    j = tl.program_id(0)
    rn, _, nmask = _columns(j, BN, N, False, D)
    rm = tl.arange(0, BM)
    mmask = rm < M
    acc = tl.zeros([BN, BM], tl.float32)
    ss = tl.zeros([BM], tl.float32)
    for it in range(0, ITERS):
        rk = it * BK + tl.arange(0, BK)
        acc, ss = _mma_block(x_ptr, d_ptr, nw_ptr, w_ptr, xo_ptr, rn, nmask, rm, mmask, rk, K, j == 0, acc, ss,
                             ADD_IN, NORM, PREC)  # fmt: skip
    inv = ss[:, None]  # unused unless NORM
    if NORM:
        inv = (1.0 / tl.sqrt(ss / K + eps))[:, None]
    # rows past M: row M - 1's indices, stored nowhere
    mc = tl.broadcast_to(tl.minimum(rm, M - 1)[:, None], [BM, BN])
    rn2 = tl.broadcast_to(rn[None, :], [BM, BN])
    y = tl.trans(acc)
    _epilogue(
        y, y, inv, mc, rn2, rn2, nmask[None, :] & mmask[:, None], y_ptr, r_ptr, b_ptr, cos_ptr, sin_ptr, kp_ptr,
        vp_ptr, slot_ptr, pool_stride, N, NORM, False, ADD_OUT, BIAS, False, D, QN, KN,
    )  # fmt: skip


@triton.jit
def _mma_finish_kernel(
    p_ptr,  # [SPLIT, M, NW] float32 partial products (_mma_partial_kernel)
    ss_ptr,  # [SPLIT, M] partial sums of squares (NORM)
    y_ptr,
    r_ptr,
    b_ptr,
    cos_ptr,
    sin_ptr,
    kp_ptr,
    vp_ptr,
    slot_ptr,
    pool_stride,
    M,
    N,
    NW,
    K,
    eps,
    SPLIT: tl.constexpr,
    BN: tl.constexpr,
    NORM: tl.constexpr,
    GLU: tl.constexpr,
    ADD_OUT: tl.constexpr,
    BIAS: tl.constexpr,
    ROPE: tl.constexpr,
    D: tl.constexpr,
    QN: tl.constexpr,
    KN: tl.constexpr,
):
    """Row m's BN columns (rope: column pairs; GLU: gate columns and their up columns): the splits' partial sums
    added in order 0, 1, ..., then the fused kernels' epilogue (norm, bias, rope and the k/v write, silu * up,
    residual add), each rounding where the plain step rounds."""
    m = tl.program_id(0) % M
    j = tl.program_id(0) // M
    rn, r2, nmask = _columns(j, BN, N, ROPE, D)
    y = tl.zeros([BN], tl.float32)
    y2 = tl.zeros([BN], tl.float32)
    inv = 0.0
    for s in tl.static_range(SPLIT):
        y += tl.load(p_ptr + (s * M + m) * NW + rn, mask=nmask, other=0.0)
        if GLU or ROPE:
            y2 += tl.load(p_ptr + (s * M + m) * NW + r2, mask=nmask, other=0.0)
        if NORM:
            inv += tl.load(ss_ptr + s * M + m)
    if NORM:
        inv = 1.0 / tl.sqrt(inv / K + eps)
    _epilogue(
        y, y2, inv, m, rn, r2, nmask, y_ptr, r_ptr, b_ptr, cos_ptr, sin_ptr, kp_ptr, vp_ptr, slot_ptr,
        pool_stride, N, NORM, GLU, ADD_OUT, BIAS, ROPE, D, QN, KN,
    )  # fmt: skip


# (BN, BK, warps, stages) swept on the device (bench/torch_bench.py, section `fused`)
FUSED_TILES = [
    (1, 512, 4, 3),
    (1, 1024, 4, 3),
    (1, 1024, 4, 2),
    (1, 1024, 8, 3),
    (1, 2048, 4, 3),
    (2, 512, 4, 2),
    (2, 512, 4, 3),
    (2, 1024, 4, 2),
    (2, 1024, 4, 3),
    (2, 2048, 8, 3),
    (4, 256, 4, 3),
    (4, 512, 4, 3),
    (4, 512, 4, 1),
    (4, 1024, 4, 3),
    (4, 1024, 8, 3),
    (8, 256, 4, 3),
    (8, 512, 4, 2),
    (8, 512, 8, 3),
    (8, 1024, 8, 2),
    (16, 512, 8, 2),
]


# (op, n, k) -> tiles, measured on an H200 (bench/torch_bench.py --sections fused, bench/TORCH.md session 13, call
# C): the fastest correct tile at 1 row per Llama-3-8B linear, CUDA-graph replay over weight copies. (n, k) is the
# weight's shape.
FUSED_TABLE: dict[tuple[str, int, int], tuple[int, int, int, int]] = {
    ("add_norm_gemv", 6144, 4096): (2, 2048, 8, 3),  # qkv: 16.9 us (cuBLAS's product alone: 16.0)
    ("add_norm_qkv_rope", 6144, 4096): (4, 1024, 4, 3),  # qkv + rope + k/v: 17.8 us (session 14 A)
    ("gemv_add", 4096, 4096): (1, 1024, 8, 3),  # o_proj: 10.0 us (13.4)
    ("norm_glu", 28672, 4096): (2, 2048, 8, 3),  # gate_up: 56.0 us (59.8)
    ("gemv", 4096, 14336): (1, 512, 4, 3),  # down_proj: 28.4 us (32.2)
    ("add_norm_gemv", 128256, 4096): (4, 1024, 4, 3),  # the lm_head: 250.4 us (240.8)
}
DEFAULT_TILES = (4, 512, 4, 3)  # other shapes: within 7% of the best on every 8B linear at 1 row (call A)


def _config(op: str, w: torch.Tensor, mma: bool) -> tuple[int, ...]:
    """The op's launch configuration over weight w: the tensor-core kernels' (mma) or the FMA kernels' tiles."""
    return mma_config(op, *w.shape) if mma else fused_config(op, *w.shape)


def fused_config(op: str, n: int, k: int) -> tuple[int, int, int, int]:
    """(BN, BK, warps, stages) for an op over a [n, k] weight (norm_glu: the fused [gate; up] weight), whatever
    the row count (the rows' results must not depend on it)."""
    return FUSED_TABLE.get((op, n, k), DEFAULT_TILES)


# (BN, BK, SPLIT, warps, stages) of the tensor-core kernels, (op, n, k) as FUSED_TABLE: the fastest fused op at one
# row on the 8B shapes (torch_bench fused --fused-tiles mma-sweep, H100, bench/TORCH.md session 29, call A; us a call,
# the FMA kernels' in brackets from session 28's probe); the plain products of one split are one kernel since session
# 42 (call 2, H100, --fused-tiles mma-one: us at 1 row, the earlier entry's in brackets where it changed)
MMA_TABLE: dict[tuple[str, int, int], tuple[int, int, int, int, int]] = {
    ("add_norm_gemv", 6144, 4096): (64, 256, 1, 4, 4),  # qkv: 20.9 in one kernel (23.0; session 28's: 26.0)
    ("add_norm_qkv_rope", 6144, 4096): (64, 256, 1, 4, 4),  # 23.4 (26.6)
    ("gemv_add", 4096, 4096): (64, 256, 1, 4, 4),  # o_proj: 14.4 in one kernel ((64, 128, 2, 4, 5): 14.9)
    ("norm_glu", 28672, 4096): (64, 256, 2, 4, 4),  # gate_up: 83.7 (77.8; (64, 256, 2, 4, 3): 85.2)
    ("gemv", 4096, 14336): (64, 256, 1, 4, 5),  # down_proj: 42.1 in one kernel ((64, 128, 4, 4, 3): 42.4)
    # the lm_head: 342.1 in one kernel (346.8); 5 stages of the op's x and delta tiles overflow the H100's shared memory
    ("add_norm_gemv", 128256, 4096): (64, 256, 1, 4, 4),
}
# other shapes (an H100 at one row runs these under fused_decode auto: every model but the 8B's widths): the table's
# most common entry, within 6% of the best at every 8B op in both sweeps (session 29 call A, session 42 call 2: qkv
# 23.0 / 20.9 us, o_proj 16.1 / 14.4, gate/up 85.7, down 44.9 / 42.7, lm_head 346.8 / 342.1), where the earlier
# default (64, 128, 1, 4, 3) took 36.8 / 34.8, 19.6 / 18.0, 99.6 / 86.0, 58.6 / 56.3 and 349.5 / 350.3 (up to 1.66x)
MMA_DEFAULT = (64, 256, 1, 4, 4)
MMA_ROWS = 16  # the activation rows' tile of the tensor-core kernels (rows 1..MAX_ROWS padded to it)
FINISH_BN = 128  # columns a program of the finishing kernel


def mma_config(op: str, n: int, k: int) -> tuple[int, int, int, int, int]:
    """(BN, BK, SPLIT, warps, stages) of the tensor-core kernels for an op over a [n, k] weight, whatever the row
    count (the rows' results must not depend on it)."""
    return MMA_TABLE.get((op, n, k), MMA_DEFAULT)


def _mma_launch(x, d, nw, w, r, y, xo, ptrs, flags, cols, n, eps, cfg) -> None:
    """_launch's product on the tensor cores, from its checked and prepared arguments: the partial products of
    each split (one kernel), then their sum in a fixed order and the epilogue (a second); one split of a plain
    product (no GLU or rope pairs): both in one kernel (_mma_one_kernel). With pairs a program of
    the one kernel owns twice the weight rows, so an op has half the programs: the 8B shape's qkv + rope took 42.9
    us against 23.4 in two kernels on an H100 (bench/TORCH.md, session 42)."""
    m, k = x.shape
    bn, bk, split, warps, stages = cfg
    prec = "ieee" if w.dtype == torch.float32 else "tf32"
    if split == 1 and not (flags["GLU"] or flags["ROPE"]):
        _mma_one_kernel[(triton.cdiv(cols, bn),)](
            x, d, nw, w, r, y, xo, *ptrs, m, n, k, eps,
            ITERS=triton.cdiv(k, bk), BN=bn, BK=bk, BM=MMA_ROWS, PREC=prec, num_warps=warps, num_stages=stages,
            **flags,
        )  # fmt: skip
        return
    nwr = w.shape[0]
    p = torch.empty(split, m, nwr, device=x.device, dtype=torch.float32)
    ss = torch.empty(split, m, device=x.device, dtype=torch.float32) if flags["NORM"] else p
    ks = bk * triton.cdiv(triton.cdiv(k, bk), split)
    _mma_partial_kernel[(triton.cdiv(nwr, bn), split)](
        x, d, nw, w, p, ss, xo, m, nwr, k,
        KS=ks, BN=bn, BK=bk, BM=MMA_ROWS, ADD_IN=flags["ADD_IN"], NORM=flags["NORM"],
        PREC=prec, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    _mma_finish_kernel[(m * triton.cdiv(cols, FINISH_BN),)](
        p, ss, y, r, *ptrs, m, n, nwr, k, eps,
        SPLIT=split, BN=FINISH_BN, **{f: v for f, v in flags.items() if f != "ADD_IN"}, num_warps=4,
    )  # fmt: skip


def _launch(x, d, nw, w, r, n, eps, add_in, norm, glu, add_out, tiles, out_dtype, rope=None, pdl=False):
    """rope: (bias or None, cos [M, D], sin, k_pool, v_pool [HKV, slots, D], slots [M], q columns, D): w is a
    [q; k; v] projection; returns q [M, q columns] with rope applied and writes k (rope applied) and v into the
    pools at the rows' slots. pdl: a programmatic dependent launch (sm90+; paged.use_kernel_pdl), which asks L2
    for its weight rows, then waits for the kernel before it: the same output, bit for bit. tiles of 5 fields
    (mma_config's): the product on the tensor cores (_mma_launch; pdl does not apply)."""
    m, k = x.shape
    if m > MAX_ROWS or w.shape[1] != k or w.shape[0] != (2 * n if glu else n):
        raise ValueError(
            f"fused gemv: x {tuple(x.shape)} and w {tuple(w.shape)} (at most {MAX_ROWS} rows, {n} columns)"
        )
    x = x.contiguous()
    w = w.contiguous()
    cols, y, xo, ptrs, flags = launch_parts(x, n, add_in, norm, glu, add_out, out_dtype, rope, "fused")
    d = d.contiguous() if add_in else x
    nw = nw if norm else x
    r = r.contiguous() if add_out else y
    if len(tiles) == 5:
        _mma_launch(x, d, nw, w, r, y, xo, ptrs, flags, cols, n, eps, tiles)
        return (xo, y) if add_in else y
    bn, bk, warps, stages = tiles
    even = cols % bn == 0 and k % bk == 0
    _fused_kernel[(m * triton.cdiv(cols, bn),)](
        x,
        d,
        nw,
        w,
        r,
        y,
        xo,
        *ptrs,
        m,
        n,
        k,
        eps,
        ITERS=triton.cdiv(k, bk),
        BN=bn,
        BK=bk,
        EVEN=even,
        num_warps=warps,
        num_stages=stages,
        **flags,
        **pdl_launch(pdl, w, bn, 32 * warps, even and (rope is None or flags["D"] // 2 % bn == 0)),
    )
    return (xo, y) if add_in else y


def pdl_launch(pdl: bool, w: torch.Tensor, bn: int, threads: int, contiguous: bool) -> dict:
    """The fused kernel's launch arguments for pdl: a programmatic dependent launch whose programs first ask L2
    for their BN weight rows (and the GLU's or rope's second BN rows), in `threads` pieces (one a thread), where
    the rows of a program are consecutive (`contiguous`: no masked tile; rope's pairs within a half head) and
    the pieces 16-byte multiples at 16-byte aligned addresses."""
    if not pdl:
        return {"PDL": False, "PF": 0, "piece": 0}
    size = bn * w.shape[1] * w.element_size()
    ok = contiguous and size % (16 * threads) == 0 and w.data_ptr() % 16 == 0
    return {
        "PDL": True,
        "PF": threads if ok else 0,
        "piece": size // threads if ok else 0,
        "launch_pdl": True,
    }


def launch_parts(x, n, add_in, norm, glu, add_out, out_dtype, rope, what):
    """What both fused kernels' launches (this module's and runtime/triton_fused_int4.py's) share: (the columns
    the programs own (rope: column pairs), the output y, x + delta's output xo (y when not ADD_IN), the epilogue's
    pointer arguments (bias, cos, sin, k pool, v pool, slots, the pool's head stride), its constexpr flags); rope
    checked against the pool."""
    bias, cos, sin, kp, vp, slots, qn, hd = rope if rope is not None else (None, x, x, x, x, x, n, 1)
    kn = (n - qn) // 2
    if rope is not None and (qn % hd or kn % hd or hd % 2 or kp.shape[0] * hd != kn or kp.stride(1) != hd):
        raise ValueError(
            f"{what} qkv + rope: {n} columns, {qn} of q, head dim {hd}, k pool {tuple(kp.shape)}"
        )
    y = torch.empty(x.shape[0], qn if rope is not None else n, device=x.device, dtype=out_dtype)
    xo = torch.empty_like(x) if add_in else y
    ptrs = (
        bias if bias is not None else x,
        cos.contiguous(),
        sin.contiguous(),
        kp,
        vp,
        slots,
        kp.stride(0) if rope is not None else 0,
    )
    flags = dict(
        ADD_IN=add_in, NORM=norm, GLU=glu, ADD_OUT=add_out, BIAS=bias is not None, ROPE=rope is not None
    )
    return n // 2 if rope is not None else n, y, xo, ptrs, {**flags, "D": hd, "QN": qn, "KN": kn}


def gemv_launch(a, w, tiles, pdl=False):
    return _launch(
        a, None, None, w, None, w.shape[0], 0.0, False, False, False, False, tiles, a.dtype, None, pdl
    )


def add_norm_gemv_launch(h, delta, nw, w, eps, tiles, pdl=False):
    return _launch(
        h, delta, nw, w, None, w.shape[0], eps, True, True, False, False, tiles, h.dtype, None, pdl
    )


def add_norm_qkv_rope_launch(
    h, delta, nw, w, eps, bias, cos, sin, k_pool, v_pool, slots, q_cols, tiles, pdl=False
):
    """add_norm_gemv over a [q; k; v] weight with rope and the k/v write in its epilogue: (x = h + delta, q)."""
    rope = (bias, cos, sin, k_pool, v_pool, slots, q_cols, k_pool.shape[2])
    return _launch(
        h, delta, nw, w, None, w.shape[0], eps, True, True, False, False, tiles, h.dtype, rope, pdl
    )


def gemv_add_launch(a, w, r, tiles, pdl=False):
    return _launch(a, None, None, w, r, w.shape[0], 0.0, False, False, False, True, tiles, a.dtype, None, pdl)


def norm_glu_launch(x, nw, w, eps, tiles, pdl=False):
    n = w.shape[0] // 2
    return _launch(x, None, nw, w, None, n, eps, False, True, True, False, tiles, x.dtype, None, pdl)


@torch.library.custom_op("lorafast::add_norm_gemv", mutates_args=())
def add_norm_gemv(
    h: torch.Tensor,
    delta: torch.Tensor,
    nw: torch.Tensor,
    w: torch.Tensor,
    eps: float,
    pdl: bool = False,
    mma: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x = h + delta, RMSNorm(x) @ w^T): h, delta [M <= 8, K], nw [K], w [N, K] → ([M, K], [M, N]). pdl: as a
    programmatic dependent launch; mma: the product on the tensor cores (every op here: `_launch`)."""
    return add_norm_gemv_launch(h, delta, nw, w, eps, _config("add_norm_gemv", w, mma), pdl)


@add_norm_gemv.register_fake
def _(h, delta, nw, w, eps, pdl=False, mma=False):
    return torch.empty_like(h), h.new_empty(h.shape[0], w.shape[0])


@torch.library.custom_op("lorafast::add_norm_qkv_rope", mutates_args=("k_pool", "v_pool"))
def add_norm_qkv_rope(
    h: torch.Tensor,
    delta: torch.Tensor,
    nw: torch.Tensor,
    w: torch.Tensor,
    eps: float,
    bias: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    slots: torch.Tensor,
    q_cols: int,
    pdl: bool = False,
    mma: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A decoder layer's first kernel: x = h + delta, qkv = RMSNorm(x) @ w^T (+ bias), rope on its q and k heads
    (cos, sin [M, D] at the rows' positions), k and v written into the pools [HKV, slots, D] at slots [M]:
    h, delta [M <= 8, K], w [q_cols + 2 HKV D, K] → (x [M, K], q [M, q_cols])."""
    return add_norm_qkv_rope_launch(
        h,
        delta,
        nw,
        w,
        eps,
        bias,
        cos,
        sin,
        k_pool,
        v_pool,
        slots,
        q_cols,
        _config("add_norm_qkv_rope", w, mma),
        pdl,
    )


@add_norm_qkv_rope.register_fake
def _(h, delta, nw, w, eps, bias, cos, sin, k_pool, v_pool, slots, q_cols, pdl=False, mma=False):
    return torch.empty_like(h), h.new_empty(h.shape[0], q_cols)


@torch.library.custom_op("lorafast::gemv_add", mutates_args=())
def gemv_add(
    a: torch.Tensor, w: torch.Tensor, r: torch.Tensor, pdl: bool = False, mma: bool = False
) -> torch.Tensor:
    """r + a @ w^T: a [M <= 8, K], w [N, K], r [M, N] → [M, N]."""
    return gemv_add_launch(a, w, r, _config("gemv_add", w, mma), pdl)


@gemv_add.register_fake
def _(a, w, r, pdl=False, mma=False):
    return a.new_empty(a.shape[0], w.shape[0])


@torch.library.custom_op("lorafast::norm_glu", mutates_args=())
def norm_glu(
    x: torch.Tensor, nw: torch.Tensor, w: torch.Tensor, eps: float, pdl: bool = False, mma: bool = False
) -> torch.Tensor:
    """silu(gate) * up of RMSNorm(x) @ w^T, w = [gate; up] [2I, K]: x [M <= 8, K] → [M, I]."""
    return norm_glu_launch(x, nw, w, eps, _config("norm_glu", w, mma), pdl)


@norm_glu.register_fake
def _(x, nw, w, eps, pdl=False, mma=False):
    return x.new_empty(x.shape[0], w.shape[0] // 2)


@torch.library.custom_op("lorafast::fused_gemv", mutates_args=())
def fused_gemv(a: torch.Tensor, w: torch.Tensor, pdl: bool = False, mma: bool = False) -> torch.Tensor:
    """a @ w^T: a [M <= 8, K], w [N, K] → [M, N]."""
    return gemv_launch(a, w, _config("gemv", w, mma), pdl)


@fused_gemv.register_fake
def _(a, w, pdl=False, mma=False):
    return a.new_empty(a.shape[0], w.shape[0])


@triton.jit
def _add_rms_norm_kernel(h_ptr, d_ptr, w_ptr, y_ptr, K, eps, BK: tl.constexpr):
    """Row m: x = h + d rounded to the row's dtype (the residual add), then RMSNorm(x) as model/decoder.RMSNorm
    computes it: x * rsqrt(mean(x^2) + eps) in float32, rounded to the dtype, times the weight, rounded again."""
    m = tl.program_id(0)
    kk = tl.arange(0, BK)
    ok = kk < K
    dt = y_ptr.dtype.element_ty
    x = (
        tl.load(h_ptr + m * K + kk, mask=ok, other=0.0).to(tl.float32)
        + tl.load(d_ptr + m * K + kk, mask=ok, other=0.0).to(tl.float32)
    ).to(dt)
    xf = x.to(tl.float32)
    r = tl.math.rsqrt(tl.sum(xf * xf, axis=0) / K + eps)
    xn = (xf * r).to(dt)
    w = tl.load(w_ptr + kk, mask=ok, other=0.0)
    tl.store(y_ptr + m * K + kk, (w.to(tl.float32) * xn.to(tl.float32)).to(dt), mask=ok)


@torch.library.custom_op("lorafast::add_rms_norm", mutates_args=())
def add_rms_norm(h: torch.Tensor, delta: torch.Tensor, nw: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm(h + delta) with weight nw: h, delta [M, K] → [M, K], one program a row (the final norm before a
    head that is not fused with it: an int8 or int4 lm_head, or more rows than the fused head takes). The eager
    norm was nine kernels of 1-2 us each in an 8B decode step (bench/TORCH.md, session 38)."""
    m, k = h.shape
    if delta.shape != h.shape or nw.shape != (k,):  # rows past paged.NORM_MAX_K keep torch's ops (logits_of)
        raise ValueError(
            f"add_rms_norm: h {tuple(h.shape)}, delta {tuple(delta.shape)}, weight {tuple(nw.shape)}"
        )
    h, delta = h.contiguous(), delta.contiguous()
    y = torch.empty_like(h)
    if m:
        bk = triton.next_power_of_2(k)
        _add_rms_norm_kernel[(m,)](h, delta, nw, y, k, eps, BK=bk, num_warps=4 if bk <= 4096 else 8)
    return y


@add_rms_norm.register_fake
def _(h, delta, nw, eps):
    return torch.empty_like(h)
