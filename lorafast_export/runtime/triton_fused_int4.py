"""The fused decode kernels of runtime/triton_fused.py for int4 layers: the same four ops (add_norm_qkv_rope,
gemv_add, norm_glu, fused_gemv) and the same epilogue, with the weight read in place from `pack_words`' int32
word layout (runtime/triton_int4.py) that `Int4TritonLinear` keeps as `weight_words`.

At batch 1 an 8B int4 layer ran its four products as separate kernels (tinygemm, GEMM_W; ~62 us a layer on the
H200) plus about 0.35 ms a step of unfused elementwise kernels (norms, adds, rope, the k/v write, silu-mul);
here each product carries its neighbours as the dense kernels do.

Per program: one activation row and BN output columns (ROPE: column pairs; GLU: gate rows and their up rows)
over the whole K, U word tiles (128 input columns each, inside one group) per loop iteration. Per tile and
weight row: 16 int32 words (a 64-byte load); nibble plane j (columns 16 j + q) becomes fp32 128 + code by a
shift and a lop3 (`_plane`), one fma with the activations' columns accumulates it ([BN, 16], no reduction in
the loop); the 128 + zero part is subtracted per tile and row through the activations' column sums, then the
tile's partial sum is multiplied by its scale once (GEMV_W's scheme). The activation row (with h + delta and
the norm weight) is loaded once per tile and reused by the BN weight rows. The RMSNorm, the roundings and the
epilogue are the dense kernel's (`triton_fused._epilogue`): y = rsqrt(mean(x^2) + eps) * ((x * w_norm) @ W^T).
Row i of a several-row call runs the same operations as the one-row call (no split-K, one row a program), bit
for bit, as a speculative verify needs.

The tile (BN, U, warps, stages, scale/zero words) per (op, n, k) comes from a table measured on the GPU
(`bench/int4_fused_bench.py --merge-into`, data/kernels/fused_int4_<gpu>.json); runtime/paged.py fuses an int4
layer only where the table holds all four of its shapes, so an unmeasured model keeps its unfused kernels.

Triton is imported only here (CUDA, or its interpreter in tests: TRITON_INTERPRET=1 before the import).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import triton
import triton.language as tl

from lorafast_export.runtime.int4_table import TABLE_DIR, gpu_slug
from lorafast_export.runtime.triton_fused import MAX_ROWS, _act, _epilogue, launch_parts
from lorafast_export.runtime.triton_int4 import _INTERPRET, _R, _WQ, WORD_COLS, _plane, _scale_zero

_WC = tl.constexpr(WORD_COLS)  # the same, for the kernels (compiled Triton reads constexpr globals only)


@triton.jit
def _tile(w_ptr, s_ptr, z_ptr, row, rn, nmask, t, N, K, G, GS: tl.constexpr, ASYM: tl.constexpr,
          SZ: tl.constexpr, EVEN: tl.constexpr):  # fmt: skip
    """Word tile t of weight rows rn (row: their word offsets): (int32 words [BN, 16], fp32 scales [BN], fp32
    128 + zero points [BN]). SZ: the scale and zero point from `pack_scale_zero`'s int32 [G, N] at z_ptr (1:
    fp16 scale bits, 2: bf16), one contiguous word per row. EVEN: no row mask (the words are padded to whole
    tiles and row blocks); else nothing is read for rows past N or a tile past K (U tiles an iteration)."""
    ptrs = w_ptr + row[:, None] + t * (_R * _WQ) + tl.arange(0, _WQ)[None, :]
    if EVEN:
        w = tl.load(ptrs)
    else:
        nmask = nmask & (t * _WC < K)
        w = tl.load(ptrs, mask=nmask[:, None], other=0)
    g = t * _WC // GS
    if SZ:
        if EVEN:
            v = tl.load(z_ptr + g * N + rn)
        else:
            v = tl.load(z_ptr + g * N + rn, mask=nmask, other=0)
        sdt: tl.constexpr = tl.float16 if SZ == 1 else tl.bfloat16
        s = (v >> 16).to(tl.int16).to(sdt, bitcast=True).to(tl.float32)
        return w, s, (v & 0xFF).to(tl.float32) + 128.0
    s, zz = _scale_zero(s_ptr, z_ptr, rn * G + g, nmask, ASYM)
    return w, s, zz


@triton.jit
def _fused_int4_kernel(
    x_ptr,  # [M, K] input rows
    d_ptr,  # [M, K] added to x first (ADD_IN)
    nw_ptr,  # [K] RMSNorm weight (NORM)
    w_ptr,  # int32 words of the [N (x 2 with GLU), K] weight, `pack_words`' layout
    s_ptr,  # [rows, G] scales (unread when SZ)
    z_ptr,  # [rows, G] uint8 zero points (ASYM), or `pack_scale_zero`'s int32 [G, rows] (SZ)
    r_ptr,  # [M, N] residual added to the output (ADD_OUT)
    y_ptr,  # [M, N] output
    xo_ptr,  # [M, K] x + d written here by the programs of column block 0 (ADD_IN)
    b_ptr,  # [N] bias added to the product (BIAS)
    cos_ptr,  # [M, D] rope's cos and sin at each row's position (ROPE)
    sin_ptr,
    kp_ptr,  # [HKV, slots, D] the layer's k and v pools (ROPE)
    vp_ptr,
    slot_ptr,  # [M] int64
    pool_stride,  # slots x D: one kv head of a pool
    M,
    N,
    K,
    KW,  # words per weight row of the layout (a row block's stride is R x KW)
    G,  # groups per weight row
    NR,  # weight rows (N, or 2 N with GLU): the scale/zero words' row stride (SZ)
    eps,
    ITERS: tl.constexpr,  # cdiv(cdiv(K, 128), U)
    BN: tl.constexpr,
    U: tl.constexpr,  # word tiles per loop iteration
    GS: tl.constexpr,  # group size, a multiple of 128
    ASYM: tl.constexpr,
    SZ: tl.constexpr,
    ADD_IN: tl.constexpr,
    NORM: tl.constexpr,
    GLU: tl.constexpr,  # up rows are rows N.. of w; output silu(gate) * up
    ADD_OUT: tl.constexpr,
    BIAS: tl.constexpr,
    ROPE: tl.constexpr,  # w is [q; k; v] heads of D rows: BN column pairs (c, c + D/2), rope on q and k
    D: tl.constexpr,
    QN: tl.constexpr,
    KN: tl.constexpr,
    EVEN: tl.constexpr,  # the columns (ROPE: pairs) a multiple of BN, K of 128 U: no masks
    ASM: tl.constexpr,  # the nibble planes by inline PTX (CUDA), else Triton's shifts and masks
):
    m = tl.program_id(0) % M  # the programs of one weight tile (its rows of x) are consecutive: L2 reuse
    pb = tl.program_id(0) // M
    dt = y_ptr.dtype.element_ty
    rn = pb * BN + tl.arange(0, BN)
    if ROPE:  # pair p: columns (p // (D/2)) * D + p % (D/2) and D/2 further, the two halves rope mixes
        nmask = rn < N // 2
        rn = (rn // (D // 2)) * D + rn % (D // 2)
        r2 = rn + D // 2
    else:
        nmask = rn < N
        r2 = rn + N  # GLU: the up row of gate row rn
    two: tl.constexpr = GLU or ROPE
    row = (rn // _R) * (_R * KW) + (rn % _R) * _WQ
    row2 = (r2 // _R) * (_R * KW) + (r2 % _R) * _WQ
    qq = tl.arange(0, _WQ)
    acc = tl.zeros([BN, _WQ], tl.float32)
    acc2 = acc  # unused unless two
    ss = tl.zeros([_WQ], tl.float32)  # the sum of squares (NORM)
    for it in range(0, ITERS):
        for u in tl.static_range(U):  # U tiles per iteration: more loads in flight
            t = it * U + u
            w, s, zz = _tile(w_ptr, s_ptr, z_ptr, row, rn, nmask, t, NR, K, G, GS, ASYM, SZ, EVEN)
            if two:
                w2, s2, zz2 = _tile(w_ptr, s_ptr, z_ptr, row2, r2, nmask, t, NR, K, G, GS, ASYM, SZ, EVEN)
            part = tl.zeros([BN, _WQ], tl.float32)
            part2 = part
            xsum = tl.zeros([_WQ], tl.float32)
            for j in tl.static_range(8):  # nibble plane j: columns 16 j + q
                kk = t * _WC + 16 * j + qq
                xf, sq = _act(x_ptr, d_ptr, nw_ptr, xo_ptr, m, K, kk, pb == 0, dt, ADD_IN, NORM, EVEN)
                if NORM:
                    ss += sq
                part += _plane(w, j, ASM) * xf[None, :]
                if two:
                    part2 += _plane(w2, j, ASM) * xf[None, :]
                xsum += xf
            acc += (part - zz[:, None] * xsum[None, :]) * s[:, None]  # the 128 + zero part, then the scale
            if two:
                acc2 += (part2 - zz2[:, None] * xsum[None, :]) * s2[:, None]
    y = tl.sum(acc, 1)
    inv = y  # unused unless NORM
    if NORM:  # RMSNorm's 1 / sqrt(mean(x^2) + eps), applied to the product
        inv = 1.0 / tl.sqrt(tl.sum(ss, 0) / K + eps)
    y2 = y  # unused unless two
    if two:
        y2 = tl.sum(acc2, 1)
    _epilogue(
        y, y2, inv, m, rn, r2, nmask, y_ptr, r_ptr, b_ptr, cos_ptr, sin_ptr, kp_ptr, vp_ptr, slot_ptr,
        pool_stride, N, NORM, GLU, ADD_OUT, BIAS, ROPE, D, QN, KN,
    )  # fmt: skip


# (BN, U, warps, stages, sz) swept on the device (bench/int4_fused_bench.py); sz 1: scales and zero points from
# `pack_scale_zero`'s words where the layer has them. Per iteration a program reads BN x U x 64 bytes of codes
# per weight row set (x 2 for norm_glu and qkv + rope); the dense kernel's best tiles read 2-8 KB.
FUSED_INT4_TILES = [
    (4, 1, 2, 3, 0),
    (4, 2, 4, 3, 0),
    (4, 4, 4, 3, 0),
    (4, 4, 4, 3, 1),
    (4, 4, 8, 2, 0),
    (8, 1, 4, 3, 0),
    (8, 2, 4, 2, 0),
    (8, 2, 4, 3, 0),
    (8, 2, 4, 3, 1),
    (8, 4, 4, 2, 0),
    (8, 4, 8, 3, 0),
    (8, 4, 8, 3, 1),
    (16, 1, 4, 3, 0),
    (16, 2, 4, 2, 0),
    (16, 2, 8, 3, 0),
    (16, 2, 8, 3, 1),
    (16, 4, 8, 1, 0),
    (16, 4, 8, 2, 1),
    (32, 1, 8, 2, 0),
    (32, 2, 8, 3, 0),
    (32, 2, 8, 4, 1),
]
# a direct call on an unmeasured shape (tests); the runtime never fuses one
DEFAULT_INT4_TILES = (8, 2, 4, 3, 0)


def table_path(gpu: str) -> Path:
    return TABLE_DIR / f"fused_int4_{gpu_slug(gpu)}.json"


def load_fused_int4_table(gpu: str) -> dict[tuple[str, int, int], tuple[int, ...]]:
    """{(op, n, k): tile} from the GPU's measured file (none: empty); entries without a tile were not measured."""
    path = table_path(gpu)
    if not path.is_file():
        return {}
    rows = json.loads(path.read_text()).get("tiles", [])
    return {(r["op"], r["n"], r["k"]): tuple(r["tile"]) for r in rows if r.get("tile")}


# (op, n, k) -> (BN, U, warps, stages, sz) for this process's GPU (n: the weight's rows; norm_glu: [gate; up])
FUSED_INT4_TABLE: dict[tuple[str, int, int], tuple[int, ...]] = (
    load_fused_int4_table(torch.cuda.get_device_name()) if torch.cuda.is_available() else {}
)


def measured(op: str, n: int, k: int) -> bool:
    return bool(FUSED_INT4_TABLE.get((op, n, k)))


def wants_words(n: int, k: int) -> tuple[bool, bool]:
    """(a fused op may read an [n, k] layer's word layout, and its scale/zero words): some measured entry has
    this shape. Int4TritonLinear then keeps those packings whatever its plan."""
    tiles = [v for (_, nn, kk), v in FUSED_INT4_TABLE.items() if (nn, kk) == (n, k) and v]
    return bool(tiles), any(len(v) > 4 and v[4] for v in tiles)


def fused_int4_config(op: str, n: int, k: int) -> tuple[int, ...]:
    return FUSED_INT4_TABLE.get((op, n, k)) or DEFAULT_INT4_TILES


def _launch(x, d, nw, q4, r, n, eps, add_in, norm, glu, add_out, tiles, rope=None):
    """q4: (words, scales [rows, G], zero points uint8 [rows, G] or None, `pack_scale_zero` words or None,
    group size) of a [rows = n (2 n with GLU), K] weight. rope as triton_fused._launch: (bias or None, cos
    [M, D], sin, k_pool, v_pool [HKV, slots, D], slots [M], q columns, D)."""
    words, s, z, sz, gs = q4
    m, k = x.shape
    bn, u, warps, stages = tiles[:4]
    use_sz = len(tiles) > 4 and bool(tiles[4]) and sz is not None
    rows = 2 * n if glu else n
    groups = triton.cdiv(k, gs) if gs > 0 else 0
    kw = triton.cdiv(k, WORD_COLS) * (WORD_COLS // 8)
    if m > MAX_ROWS or s.shape != (rows, groups) or gs <= 0 or gs % WORD_COLS:
        raise ValueError(
            f"fused int4 gemv: x {tuple(x.shape)}, scales {tuple(s.shape)}, group size {gs} (at most {MAX_ROWS} "
            f"rows, {rows} weight rows, groups of a multiple of {WORD_COLS} columns)"
        )
    if words.dtype != torch.int32 or words.shape[1] != kw or words.shape[0] < triton.cdiv(rows, 32) * 32:
        raise ValueError(
            f"fused int4 gemv: words {tuple(words.shape)} {words.dtype}, not pack_words of [{rows}, {k}]"
        )
    if (z is not None and (z.shape != s.shape or z.dtype != torch.uint8)) or (
        sz is not None and (sz.shape != (groups, rows) or sz.dtype != torch.int32)
    ):
        raise ValueError(
            f"fused int4 gemv: zero points / scale-zero words do not match scales {tuple(s.shape)}"
        )
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"fused int4 gemv: activations in {x.dtype}")
    x = x.contiguous()
    cols, y, xo, ptrs, flags = launch_parts(x, n, add_in, norm, glu, add_out, x.dtype, rope, "fused int4")
    zp = sz if use_sz else z if z is not None else s  # s: never read when symmetric
    _fused_int4_kernel[(m * triton.cdiv(cols, bn),)](
        x,
        d.contiguous() if add_in else x,
        nw if norm else x,
        words,
        s,
        zp,
        r.contiguous() if add_out else y,
        y,
        xo,
        *ptrs,
        m,
        n,
        k,
        kw,
        groups,
        rows,
        eps,
        ITERS=triton.cdiv(triton.cdiv(k, WORD_COLS), u),
        BN=bn,
        U=u,
        GS=gs,
        ASYM=z is not None,
        SZ=(1 if s.dtype == torch.float16 else 2) if use_sz else 0,
        EVEN=cols % bn == 0 and k % (WORD_COLS * u) == 0,
        ASM=not _INTERPRET,
        num_warps=warps,
        num_stages=stages,
        **flags,
    )
    return (xo, y) if add_in else y


def gemv_int4_launch(a, q4, tiles):
    return _launch(a, None, None, q4, None, q4[1].shape[0], 0.0, False, False, False, False, tiles)


def add_norm_qkv_rope_int4_launch(
    h, delta, nw, q4, eps, bias, cos, sin, k_pool, v_pool, slots, q_cols, tiles
):
    """add_norm_qkv_rope over an int4 [q; k; v] weight: (x = h + delta, q), k and v written into the pools."""
    rope = (bias, cos, sin, k_pool, v_pool, slots, q_cols, k_pool.shape[2])
    return _launch(h, delta, nw, q4, None, q4[1].shape[0], eps, True, True, False, False, tiles, rope)


def gemv_add_int4_launch(a, q4, r, tiles):
    return _launch(a, None, None, q4, r, q4[1].shape[0], 0.0, False, False, False, True, tiles)


def norm_glu_int4_launch(x, nw, q4, eps, tiles):
    return _launch(x, None, nw, q4, None, q4[1].shape[0] // 2, eps, False, True, True, False, tiles)


# The ops take an int4 weight as (w words, s scales [rows, G], z zero points or None, sz scale/zero words or
# None, group size), `Int4TritonLinear`'s weight_words, scales, zeros, scale_zero_words and group_size.


@torch.library.custom_op("lorafast::add_norm_qkv_rope_int4", mutates_args=("k_pool", "v_pool"))
def add_norm_qkv_rope_int4(
    h: torch.Tensor,
    delta: torch.Tensor,
    nw: torch.Tensor,
    w: torch.Tensor,
    s: torch.Tensor,
    z: torch.Tensor | None,
    sz: torch.Tensor | None,
    group_size: int,
    eps: float,
    bias: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    slots: torch.Tensor,
    q_cols: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """triton_fused.add_norm_qkv_rope over an int4 [q; k; v] weight: (x [M, K], q [M, q_cols])."""
    q4 = (w, s, z, sz, group_size)
    tiles = fused_int4_config("add_norm_qkv_rope", s.shape[0], h.shape[1])
    return add_norm_qkv_rope_int4_launch(
        h, delta, nw, q4, eps, bias, cos, sin, k_pool, v_pool, slots, q_cols, tiles
    )


@add_norm_qkv_rope_int4.register_fake
def _(h, delta, nw, w, s, z, sz, group_size, eps, bias, cos, sin, k_pool, v_pool, slots, q_cols):
    return torch.empty_like(h), h.new_empty(h.shape[0], q_cols)


@torch.library.custom_op("lorafast::gemv_add_int4", mutates_args=())
def gemv_add_int4(
    a: torch.Tensor,
    w: torch.Tensor,
    s: torch.Tensor,
    z: torch.Tensor | None,
    sz: torch.Tensor | None,
    group_size: int,
    r: torch.Tensor,
) -> torch.Tensor:
    """r + a @ W^T, W int4 [N, K]: a [M <= 8, K], r [M, N] → [M, N]."""
    tiles = fused_int4_config("gemv_add", s.shape[0], a.shape[1])
    return gemv_add_int4_launch(a, (w, s, z, sz, group_size), r, tiles)


@gemv_add_int4.register_fake
def _(a, w, s, z, sz, group_size, r):
    return a.new_empty(a.shape[0], s.shape[0])


@torch.library.custom_op("lorafast::norm_glu_int4", mutates_args=())
def norm_glu_int4(
    x: torch.Tensor,
    nw: torch.Tensor,
    w: torch.Tensor,
    s: torch.Tensor,
    z: torch.Tensor | None,
    sz: torch.Tensor | None,
    group_size: int,
    eps: float,
) -> torch.Tensor:
    """silu(gate) * up of RMSNorm(x) @ W^T, W = int4 [gate; up] [2I, K]: x [M <= 8, K] → [M, I]."""
    tiles = fused_int4_config("norm_glu", s.shape[0], x.shape[1])
    return norm_glu_int4_launch(x, nw, (w, s, z, sz, group_size), eps, tiles)


@norm_glu_int4.register_fake
def _(x, nw, w, s, z, sz, group_size, eps):
    return x.new_empty(x.shape[0], s.shape[0] // 2)


@torch.library.custom_op("lorafast::fused_gemv_int4", mutates_args=())
def fused_gemv_int4(
    a: torch.Tensor,
    w: torch.Tensor,
    s: torch.Tensor,
    z: torch.Tensor | None,
    sz: torch.Tensor | None,
    group_size: int,
) -> torch.Tensor:
    """a @ W^T, W int4 [N, K]: a [M <= 8, K] → [M, N]."""
    return gemv_int4_launch(a, (w, s, z, sz, group_size), fused_int4_config("gemv", s.shape[0], a.shape[1]))


@fused_gemv_int4.register_fake
def _(a, w, s, z, sz, group_size):
    return a.new_empty(a.shape[0], s.shape[0])
