"""int4 weight-only matmuls as Triton kernels that read the quantized form's packed nibbles in place.

Weights stay as qform packs them on disk (`qform.pack_nibbles`): uint8 [out, ceil(in/2)], byte j holding
the code of input column 2j in its low nibble and 2j+1 in its high nibble; scales [out, groups] in their
stored dtype; zero points uint8 [out, groups], or none (symmetric: zero 8). w = (code - zero) * scale.

Two kernels, both with split-K (each split writes an fp32 partial, summed and cast by a third small
kernel; one split stores the result directly in the activation dtype). A tile spans BK input columns
inside one group (BK divides the group size), so its scale multiplies the tile's partial sum once, not
every weight: per weight the work is the nibble unpack, one integer-to-float conversion and the
zero-point subtraction. The activations are
loaded contiguously and split into their even and odd columns, so the nibbles need no interleaving, and
the codes load as aligned 16-byte vectors (tile offsets are multiples of BK / 2 bytes, rows KB bytes).
- GEMV for a few rows: no tensor cores; products summed over the tile in fp32, one row at a time.
- GEMM for more rows: (code - zero) is exact in bf16/fp16 and goes to tl.dot.
Two more kernels, GEMV_T and GEMM_T (below `tile_cols`), read the codes repacked at load into a tiled,
blocked layout, convert nibbles by bit tricks (GEMM_T optionally by inline PTX) and, for GEMM_T, swap the
operands so the weight rows are the MMA's M dimension.
GEMM_W and GEMV_W (below `pack_words`) read them as int32 words in the order of the tensor-core operand's
register fragment (session 7, H200, 8B shapes: the fastest at 8 and 32 rows, and at 1 row for gate_up and
down; bench/TORCH.md).
Which kernel and which tile sizes run for a (shape, rows) comes from a table measured on the device
(runtime/int4_table.py); `int4_mm` takes that plan and picks the entry for the batch it sees.

Triton is imported only here (CUDA, or its interpreter in tests: TRITON_INTERPRET=1 before the import).
The op is a torch custom op: opaque to inductor, captured in the step's CUDA graph.
"""

import os

import torch
import triton
import triton.language as tl

from lorafast_export.runtime.tinygemm import tinygemm_mm

# One plan entry: (max rows, kind, BN, BK, splits, BM, warps) with kind 0 = GEMV, 1 = GEMM, 2 = torch's
# tinygemm (the layer then also holds tinygemm's packing; the tile fields are unused), 3 = GEMV_T and
# 4 = GEMM_T (the tiled layout, `pack_tiles`; the BK field then holds options: bit 0 scale every weight
# (GEMM_T), bits 1-3 num_stages (0: Triton's default), bits 4-5 log2 of the tiles per loop iteration, bit 6
# nibbles to bf16 by inline PTX (GEMM_T on CUDA; the interpreter takes the fp32 path)); 5 = GEMM_W (the
# word layout, `pack_words`; BK holds options: bit 0 scale every weight, bits 1-3 num_stages, bit 5 scales
# and zero points from `pack_scale_zero`'s int32 [G, N], where the layer has it); 6 = GEMV_W (the word layout, no tensor cores;
# BK holds options: bits 1-3 num_stages, bit 4 the next tile's loads one iteration ahead); 7 = DEQUANT (for
# prefill-sized row counts: the word layout dequantized once per call to a dense weight in the activation
# dtype by `_dequant_w_kernel` (BN rows a program), then torch's matmul (cuBLAS); BK, splits, BM unused); 8 = MMA
# (1-8 rows: the CUDA tensor-core kernel of runtime/cuda_int4.py on `pack_frags`' layout; BN holds its warps
# per block, BK its 16-row tiles per warp (0 or 1: one), BM the blocks per SM asked of the compiler (0: none),
# warps its variant bits (bit 0: the zero point subtracted from the A operand, `cuda_int4.SUBA`; bit 1: launched as a
# programmatic dependent launch, `cuda_int4.PDL`, set at load by paged.use_kernel_pdl); splits unused).
ENTRY = 7
GEMV, GEMM, TINYGEMM, GEMV_T, GEMM_T, GEMM_W, GEMV_W, DEQUANT, MMA = 0, 1, 2, 3, 4, 5, 6, 7, 8
WORD_KINDS = (GEMM_W, GEMV_W, DEQUANT)  # the kinds that read `pack_words`' layout
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _jit(fn):
    """triton.jit with ITERS (tiles per split) a runtime value on the GPU, so a new K or split count does
    not compile the kernel again. Triton's interpreter (the CPU tests) cannot loop to a runtime bound under
    numpy 2: there it stays the compile-time constant the source declares. Sizes that only bound masks are
    not specialised (one compile per tile shape); K and KB are, as they set the row strides (aligned loads)."""
    if _INTERPRET:
        return triton.jit(fn)
    fn.__annotations__.pop("ITERS")
    return triton.jit(fn, do_not_specialize=["M", "N", "G", "ITERS"])


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    """tl.dot (acc None: a fresh one), exact in fp32 when IEEE (fp32 activations: the default rounds the
    inputs to tf32)."""
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


def split_out(x: torch.Tensor, n: int, tiles: int, splits: int) -> tuple[int, int, torch.Tensor]:
    """Split-K of `tiles` K-tiles into at most `splits`: (tiles per split, splits that hold tiles, the
    kernel's output: [M, N] in x's dtype for one split, else fp32 partials [splits, M, N] for sum_splits)."""
    iters = triton.cdiv(tiles, splits)
    splits = triton.cdiv(tiles, iters)
    shape, dtype = ((x.shape[0], n), x.dtype) if splits == 1 else ((splits, x.shape[0], n), torch.float32)
    return iters, splits, torch.empty(shape, device=x.device, dtype=dtype)


@_jit
def _gemv_kernel(
    x_ptr,  # [M, K] activations
    w_ptr,  # [N, KB] uint8 packed nibbles, KB = ceil(K / 2)
    s_ptr,  # [N, G] scales
    z_ptr,  # [N, G] uint8 zero points (unused when symmetric)
    out_ptr,  # [SPLITS, M, N] fp32 partials, or [M, N] in x's dtype with one split
    M,
    N,
    K,
    KB,
    G,
    ITERS: tl.constexpr,  # tiles per split
    MP: tl.constexpr,  # M padded to a power of two
    BN: tl.constexpr,
    BK: tl.constexpr,  # divides GS
    GS: tl.constexpr,
    ASYM: tl.constexpr,
):
    pid_n = tl.program_id(0)
    sp = tl.program_id(1)
    nn = pid_n * BN + tl.arange(0, BN)
    mm = tl.arange(0, MP)
    jj = tl.arange(0, BK // 2)
    kk = tl.arange(0, BK)
    n_ok = nn < N
    acc = tl.zeros([MP, BN], tl.float32)
    for it in range(0, ITERS):
        t = sp * ITERS + it  # tile index along K; tiles past K load nothing (masked)
        k0 = t * BK
        kb0 = t * (BK // 2)
        w = tl.load(
            w_ptr + nn[:, None] * KB + (kb0 + jj)[None, :], mask=n_ok[:, None] & (kb0 + jj < KB)[None, :]
        )
        g_off = nn * G + k0 // GS
        g_ok = n_ok & (k0 < K)
        s = tl.load(s_ptr + g_off, mask=g_ok, other=0.0).to(tl.float32)  # [BN]
        if ASYM:
            z = tl.load(z_ptr + g_off, mask=g_ok, other=0).to(tl.float32)[:, None]
        else:
            z = 8.0
        lo = (w & 0xF).to(tl.float32) - z  # [BN, BK/2]
        hi = (w >> 4).to(tl.float32) - z
        for m in tl.static_range(MP):  # rows one by one: 2-D tiles stay in the layout they were loaded in
            x = tl.load(x_ptr + m * K + k0 + kk, mask=(k0 + kk < K) & (m < M), other=0.0)  # [BK]
            xe, xo = tl.split(tl.reshape(x.to(tl.float32), [BK // 2, 2]))
            part = tl.sum(lo * xe[None, :] + hi * xo[None, :], axis=1) * s  # [BN]
            acc += tl.where(mm[:, None] == m, part[None, :], 0.0)
    o_off = (sp * M + mm[:, None]) * N + nn[None, :]
    tl.store(out_ptr + o_off, acc.to(out_ptr.dtype.element_ty), mask=(mm < M)[:, None] & n_ok[None, :])


@_jit
def _gemm_kernel(
    x_ptr,  # [M, K]
    w_ptr,  # [N, KB] uint8
    s_ptr,  # [N, G]
    z_ptr,  # [N, G] uint8
    out_ptr,  # [SPLITS, M, N] fp32, or [M, N] in x's dtype
    M,
    N,
    K,
    KB,
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
    jj = tl.arange(0, BK // 2)
    kk = tl.arange(0, BK)
    n_ok = nn < N
    m_ok = mm < M
    acc = tl.zeros([BM, BN], tl.float32)
    for it in range(0, ITERS):
        t = sp * ITERS + it
        k0 = t * BK
        kb0 = t * (BK // 2)
        w = tl.load(
            w_ptr + nn[:, None] * KB + (kb0 + jj)[None, :], mask=n_ok[:, None] & (kb0 + jj < KB)[None, :]
        )
        x = tl.load(
            x_ptr + mm[:, None] * K + (k0 + kk)[None, :],
            mask=m_ok[:, None] & (k0 + kk < K)[None, :],
            other=0.0,
        )
        xe, xo = tl.split(tl.reshape(x, [BM, BK // 2, 2]))  # [BM, BK/2] each
        g_off = nn * G + k0 // GS
        g_ok = n_ok & (k0 < K)
        s = tl.load(s_ptr + g_off, mask=g_ok, other=0.0).to(tl.float32)  # [BN]
        if ASYM:
            z = tl.load(z_ptr + g_off, mask=g_ok, other=0).to(tl.int16)[:, None]
        else:
            z = 8
        w_lo = ((w & 0xF).to(tl.int16) - z).to(x.dtype)  # [BN, BK/2], exact small integers
        w_hi = ((w >> 4).to(tl.int16) - z).to(x.dtype)
        acc += _dot(xo, tl.trans(w_hi), _dot(xe, tl.trans(w_lo), None, IEEE), IEEE) * s[None, :]
    o_off = (sp * M + mm[:, None]) * N + nn[None, :]
    tl.store(out_ptr + o_off, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


# ---------------------------------------------------------------------------------------- tiled layout
# The kernels below (kinds GEMV_T, GEMM_T) read the codes repacked once at load (`pack_tiles`):
# - per tile of T = tile_cols(group size) input columns, byte j holds column j in its low nibble and column
#   T/2 + j in its high one, so a tile's low and high nibbles are two contiguous column runs and the
#   activations load as two contiguous halves: no even/odd split of x, no layout shuffle;
# - blocked: the tiles of ROWS_PER_BLOCK consecutive rows are stored together, tile after tile
#   ([N/R][K/T][R][T/2] bytes), so a program streams contiguous 2 KB chunks (R = 32, T = 128) instead of
#   64 bytes from each of many rows 2 KB apart (call A, session 6: 1.0-1.3 TB/s of codes that way, at any
#   tile or warp count).
# The nibble becomes a float without an int-to-float conversion (quarter rate on Hopper):
# (code << 16) | 0x43000000, read as fp32, is 128 + code exactly; subtracting 128 + zero gives code - zero.
ROWS_PER_BLOCK = 32
_R = tl.constexpr(ROWS_PER_BLOCK)  # the same, for the kernels


def tile_cols(group_size: int) -> int:
    """Input columns per tile of the tiled layout: inside one group (so one scale per tile row)."""
    return min(group_size, 128)


def pack_tiles(codes: torch.Tensor, group_size: int) -> torch.Tensor:
    """codes uint8 [out, in] (0..15, groups contiguous) → uint8 [ceil(out / R) * R, ceil(in / T) * T / 2],
    the blocked tiled layout (zero codes pad the last tile and block; the kernels mask them)."""
    t, r = tile_cols(group_size), ROWS_PER_BLOCK
    out_f, in_f = codes.shape
    c = torch.nn.functional.pad(codes.to(torch.uint8), (0, -in_f % t, 0, -out_f % r))
    c = c.view(c.shape[0] // r, r, c.shape[1] // t, 2, t // 2)
    c = c[:, :, :, 0] | (c[:, :, :, 1] << 4)  # [N/R, R, K/T, T/2]
    return c.permute(0, 2, 1, 3).contiguous().view(-1, c.shape[2] * (t // 2))


@triton.jit
def _tile_ptrs(w_ptr, nn, t, jj, KB, T: tl.constexpr, R: tl.constexpr):
    """Byte addresses [len(nn), T/2] of tile t of rows nn in the blocked tiled layout (row stride KB)."""
    row = (nn // R) * (R * KB) + (nn % R) * (T // 2)
    return w_ptr + row[:, None] + t * (R * (T // 2)) + jj[None, :]


@triton.jit
def _tile_codes(
    w_ptr,
    s_ptr,
    z_ptr,
    nn,
    n_ok,
    t,
    K,
    KB,
    G,
    GS: tl.constexpr,
    T: tl.constexpr,
    ASYM: tl.constexpr,
    EVEN: tl.constexpr,
):
    """Tile t of rows nn in the tiled layout: (codes uint8 [R, T/2], fp32 scales [R], uint8 zero points
    [R] (when ASYM; else unused), its first column). EVEN: every tile inside K, no column mask."""
    jj = tl.arange(0, T // 2)
    if EVEN:
        wm, g_ok = n_ok[:, None], n_ok
    else:
        wm, g_ok = n_ok[:, None] & (t * (T // 2) + jj < KB)[None, :], n_ok & (t * T < K)
    w = tl.load(_tile_ptrs(w_ptr, nn, t, jj, KB, T, _R), mask=wm)
    g_off = nn * G + t * T // GS
    s = tl.load(s_ptr + g_off, mask=g_ok, other=0.0).to(tl.float32)
    if ASYM:
        z = tl.load(z_ptr + g_off, mask=g_ok, other=0)
    else:
        z = g_off  # unused
    return w, s, z, t * T


@triton.jit
def _nibbles(w, z, ASYM: tl.constexpr):
    """w uint8 [R, C] → (low, high) fp32 code - zero, exact; z: uint8 zero points [R] (ignored if not ASYM)."""
    wi = w.to(tl.int32)
    lo = (((wi & 0xF) << 16) | 0x43000000).to(tl.float32, bitcast=True)
    hi = (((wi & 0xF0) << 12) | 0x43000000).to(tl.float32, bitcast=True)
    if ASYM:
        zz = (z.to(tl.int32) + 128).to(tl.float32)[:, None]
    else:
        zz = 136.0
    return lo - zz, hi - zz


def _nibbles_ptx(scaled: bool) -> str:
    """PTX for four codes' bytes ($4) → 8 bf16 values, two per register: low nibbles ($0, $1), high ($2, $3).
    prmt spreads bytes 0, 1 (2, 3) into the two 16-bit halves, lop3 keeps one nibble per half and ORs in
    0x4300 (bf16 128 + code, exact), one packed fma adds - (128 + zero) ($5, $6): code - zero, exact.
    scaled: one more packed fma multiplies by the scale ($7, $8), rounding once to bf16 as a dequantized
    bf16 weight does. 1.5 (2) instructions per nibble, against about 5 through fp32."""
    lines = [
        "{",
        ".reg .b32 t0, t1, t2, zr, one, mz, r0, r1, r2, r3;",  # outputs written last: no aliasing worry
        "mov.b32 zr, 0;",
        "mov.b32 one, 0x3F803F80;",
        "mov.b32 mz, 0x80008000;",
        "prmt.b32 t0, $4, zr, 0x4140;",
        "prmt.b32 t1, $4, zr, 0x4342;",
    ]
    for out, src, nz, sc in (("r0", "t0", "$5", "$7"), ("r1", "t1", "$6", "$8"), ("r2",) * 4, ("r3",) * 4):
        if out == "r2":  # the high nibbles: shift each half down by 4
            lines += ["shr.b32 t0, t0, 4;", "shr.b32 t1, t1, 4;"]
        if out in ("r2", "r3"):
            src, nz, sc = {"r2": ("t0", "$5", "$7"), "r3": ("t1", "$6", "$8")}[out]
        lines.append(f"lop3.b32 t2, {src}, 0x000F000F, 0x43004300, 0xEA;")
        lines.append(f"fma.rn.bf16x2 {out}, t2, one, {nz};")
        if scaled:
            lines.append(f"fma.rn.bf16x2 {out}, {out}, {sc}, mz;")
    lines += [f"mov.b32 ${i}, r{i};" for i in range(4)]
    return "\n".join([*lines, "}"])


_NIBBLES_PTX = tl.constexpr(_nibbles_ptx(False))
_NIBBLES_PTX_SCALED = tl.constexpr(_nibbles_ptx(True))


@triton.jit
def _nibbles_asm(w, z, s, ASYM: tl.constexpr, SCALED: tl.constexpr):
    """w uint8 [R, C] → (low, high) bf16 code - zero, exact, or times the row's scale s [R] when SCALED
    (CUDA only: inline PTX, see _nibbles_ptx)."""
    if ASYM:
        nz = tl.broadcast_to((-(z.to(tl.float32) + 128.0)).to(tl.bfloat16)[:, None], w.shape)
    else:
        nz = tl.full(w.shape, -136.0, tl.bfloat16)
    if SCALED:
        sc = tl.broadcast_to(s.to(tl.bfloat16)[:, None], w.shape)
        return tl.inline_asm_elementwise(
            _NIBBLES_PTX_SCALED,
            "=r,=r,=r,=r,r,r,r,r,r",
            [w, nz, sc],
            dtype=(tl.bfloat16, tl.bfloat16),
            is_pure=True,
            pack=4,
        )
    return tl.inline_asm_elementwise(
        _NIBBLES_PTX, "=r,=r,=r,=r,r,r,r", [w, nz], dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4
    )


@_jit
def _gemv_t_kernel(
    x_ptr,  # [M, K] activations
    w_ptr,  # [N, KB] uint8, tiled layout
    s_ptr,  # [N, G]
    z_ptr,  # [N, G] uint8
    out_ptr,  # [SPLITS, M, N] fp32, or [M, N] in x's dtype
    M,
    N,
    K,
    KB,
    G,
    ITERS: tl.constexpr,
    MP: tl.constexpr,
    BN: tl.constexpr,
    T: tl.constexpr,  # tile columns (tile_cols)
    U: tl.constexpr,  # tiles per loop iteration
    GS: tl.constexpr,
    ASYM: tl.constexpr,
    EVEN: tl.constexpr,  # K a whole number of tiles, every split full: no column masks
):
    pid_n = tl.program_id(0)
    sp = tl.program_id(1)
    nn = pid_n * BN + tl.arange(0, BN)
    mm = tl.arange(0, MP)
    jj = tl.arange(0, T // 2)
    n_ok = nn < N
    acc = tl.zeros([MP, BN], tl.float32)
    for it in range(0, ITERS):
        for u in tl.static_range(U):  # U tiles per iteration: more loads in flight
            t = (sp * ITERS + it) * U + u
            w, s, z, k0 = _tile_codes(w_ptr, s_ptr, z_ptr, nn, n_ok, t, K, KB, G, GS, T, ASYM, EVEN)
            if EVEN:  # every tile inside K: no column masks
                xlm, xhm = jj >= 0, jj >= 0
            else:
                xlm, xhm = k0 + jj < K, k0 + T // 2 + jj < K
            lo, hi = _nibbles(w, z, ASYM)
            for m in tl.static_range(MP):
                xl = tl.load(x_ptr + m * K + k0 + jj, mask=xlm & (m < M), other=0.0).to(tl.float32)
                xh = tl.load(x_ptr + m * K + k0 + T // 2 + jj, mask=xhm & (m < M), other=0.0)
                part = tl.sum(lo * xl[None, :] + hi * xh.to(tl.float32)[None, :], axis=1) * s
                acc += tl.where(mm[:, None] == m, part[None, :], 0.0)
    o_off = (sp * M + mm[:, None]) * N + nn[None, :]
    tl.store(out_ptr + o_off, acc.to(out_ptr.dtype.element_ty), mask=(mm < M)[:, None] & n_ok[None, :])


@_jit
def _gemm_t_kernel(
    x_ptr,  # [M, K]
    w_ptr,  # [N, KB] uint8, tiled layout
    s_ptr,  # [N, G]
    z_ptr,  # [N, G] uint8
    out_ptr,  # [SPLITS, M, N] fp32, or [M, N] in x's dtype
    M,
    N,
    K,
    KB,
    G,
    ITERS: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    T: tl.constexpr,
    U: tl.constexpr,
    GS: tl.constexpr,
    ASYM: tl.constexpr,
    EVEN: tl.constexpr,  # K a whole number of tiles, every split full: no column masks
    SCALE_W: tl.constexpr,  # scale each weight before the dot (else the tile's partial sum after it)
    IEEE: tl.constexpr,
    ASM: tl.constexpr,  # nibbles to bf16 by inline PTX (_nibbles_asm), else through fp32 (_nibbles)
):
    """Swapped operands: out^T [BN, BM] = W tile [BN, T] @ x^T [T, BM], so the weight rows are the MMA's
    M dimension (Hopper's wgmma wants 64 per warpgroup) and a few activation rows its N dimension."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    sp = tl.program_id(2)
    nn = pid_n * BN + tl.arange(0, BN)
    mm = pid_m * BM + tl.arange(0, BM)
    jj = tl.arange(0, T // 2)
    n_ok = nn < N
    m_ok = mm < M
    acc = tl.zeros([BN, BM], tl.float32)
    for it in range(0, ITERS):
        for u in tl.static_range(U):  # U tiles per iteration: more loads in flight
            t = (sp * ITERS + it) * U + u
            w, s, z, k0 = _tile_codes(w_ptr, s_ptr, z_ptr, nn, n_ok, t, K, KB, G, GS, T, ASYM, EVEN)
            if EVEN:  # every tile inside K: no column masks
                xlm, xhm = m_ok[None, :], m_ok[None, :]
            else:
                xlm = m_ok[None, :] & (k0 + jj < K)[:, None]
                xhm = m_ok[None, :] & (k0 + T // 2 + jj < K)[:, None]
            xl = tl.load(x_ptr + mm[None, :] * K + (k0 + jj)[:, None], mask=xlm, other=0.0)  # [T/2, BM]
            xh = tl.load(x_ptr + mm[None, :] * K + (k0 + T // 2 + jj)[:, None], mask=xhm, other=0.0)
            if ASM:
                lo, hi = _nibbles_asm(w, z, s, ASYM, SCALE_W)  # bf16, times s when SCALE_W
            else:
                lo, hi = _nibbles(w, z, ASYM)
                if SCALE_W:
                    lo, hi = lo * s[:, None], hi * s[:, None]
            lo, hi = lo.to(xl.dtype), hi.to(xl.dtype)
            if SCALE_W:
                acc = _dot(hi, xh, _dot(lo, xl, acc, IEEE), IEEE)
            else:
                acc += _dot(hi, xh, _dot(lo, xl, None, IEEE), IEEE) * s[:, None]
    o_off = (sp * M + mm[None, :]) * N + nn[:, None]
    tl.store(out_ptr + o_off, acc.to(out_ptr.dtype.element_ty), mask=m_ok[None, :] & n_ok[:, None])


# ----------------------------------------------------------------------------------------- word layout
# GEMM_W reads the codes repacked once at load (`pack_words`) as int32 words: per tile of 128 input
# columns (inside one group) and row, 16 words; nibble j of word q holds column 16 j + q. The tiles of
# ROWS_PER_BLOCK rows are stored together (2 KB chunks), as in the tiled layout. In the kernel the 8
# nibbles of a word become 8 [BN, 16] operands (one inline-PTX call per two words: prmt, shift, lop3 and
# one packed bf16 add per two nibbles), joined and permuted back into one [BN, 128] operand in column
# order. Triton 3.6 maps that join/permute onto the MMA's register fragment with no data movement: each
# thread loads exactly the words of its fragment (64-bit shared loads, no byte assembly) and the tile is
# one wgmma group with one wait (GEMM_T: byte loads, 60 prmt per tile, two waits).
WORD_COLS = 128  # input columns per word tile
_WQ = tl.constexpr(WORD_COLS // 8)  # words per tile row


def pack_scale_zero(scales: torch.Tensor, zeros: torch.Tensor | None) -> torch.Tensor | None:
    """scales [out, G] (fp16 or bf16) and uint8 zero points [out, G] (None: symmetric, zero 8) → int32 [G, out]:
    the scale's 16 bits over the zero point, for GEMM_W's option bit 5. None for other scale dtypes (fp32
    scales would lose bits)."""
    if scales.dtype not in (torch.float16, torch.bfloat16):
        return None
    z = torch.full_like(scales, 8, dtype=torch.int32) if zeros is None else zeros.to(torch.int32)
    bits = scales.contiguous().view(torch.int16).to(torch.int32) << 16
    return (bits | z).T.contiguous()


def pack_words(codes: torch.Tensor) -> torch.Tensor:
    """codes uint8 [out, in] (0..15) → int32 [ceil(out / R) * R, ceil(in / 128) * 16], the blocked word
    layout ([N/R][K/128][R][16] words; zero codes pad the last tile and block; the kernel masks them)."""
    r, t = ROWS_PER_BLOCK, WORD_COLS
    out_f, in_f = codes.shape
    c = torch.nn.functional.pad(codes.to(torch.uint8), (0, -in_f % t, 0, -out_f % r))
    c = c.view(c.shape[0] // r, r, c.shape[1] // t, 8, t // 8)  # [.., j, q]: column 16 j + q
    w = c[:, :, :, 0].to(torch.int32)  # [N/R, R, K/T, 16]; one int32 temporary, ORed in place
    for j in range(1, 8):
        w |= c[:, :, :, j].to(torch.int32) << (4 * j)  # nibble 7 lands in bit 31: the int32 wraps
    return w.permute(0, 2, 1, 3).contiguous().view(-1, c.shape[2] * (t // 8))


def _words_ptx(scaled: bool) -> str:
    """PTX for two words ($8, $9: elements e, e + 1) → 8 registers ($0-$7), register j holding nibble j of
    both words as bf16x2 (low half: word $8): prmt gathers the low (high) 16 bits of both words, a shift
    and lop3 keep one nibble per half and OR in 0x4300 (bf16 128 + code, exact), a packed add of
    -(128 + zero) ($10, $11) gives code - zero, exact; scaled: a packed multiply by the scale ($12, $13)."""
    lines = [
        "{",
        ".reg .b32 lo, hi, t, one, mz, nz, sc;",
        "mov.b32 one, 0x3F803F80;",
        "mov.b32 mz, 0x80008000;",
        "prmt.b32 lo, $8, $9, 0x5410;",
        "prmt.b32 hi, $8, $9, 0x7632;",
        "prmt.b32 nz, $10, $11, 0x5410;",  # element e's zero in the low half, e + 1's in the high
    ]
    if scaled:
        lines.append("prmt.b32 sc, $12, $13, 0x5410;")
    for j in range(8):
        src, sh = ("lo", "hi")[j // 4], 4 * (j % 4)
        if sh:
            lines.append(f"shr.b32 t, {src}, {sh};")
        lines.append(f"lop3.b32 t, {'t' if sh else src}, 0x000F000F, 0x43004300, 0xEA;")
        lines.append(f"fma.rn.bf16x2 ${j}, t, one, nz;")
        if scaled:
            lines.append(f"fma.rn.bf16x2 ${j}, ${j}, sc, mz;")
    return "\n".join([*lines, "}"])


_WORDS_PTX = tl.constexpr([_words_ptx(False), _words_ptx(True)])  # [SCALE_W]
_WORDS_CONS = tl.constexpr("=r," * 8 + "r,r,r,r,r,r")  # 8 outputs; words, zeros, scales (2 each: pack=2)


@triton.jit
def _bf16_bits(v):
    """fp32 [R] → int32 [R]: v rounded to bf16, its 16 bits in the low half."""
    return v.to(tl.bfloat16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF


@triton.jit
def _scale_zero(s_ptr, z_ptr, g_off, g_ok, ASYM: tl.constexpr):
    """(fp32 scale, fp32 128 + zero point) [R] of one group per row (symmetric: zero point 8)."""
    s = tl.load(s_ptr + g_off, mask=g_ok, other=0.0).to(tl.float32)
    if ASYM:
        return s, tl.load(z_ptr + g_off, mask=g_ok, other=0).to(tl.float32) + 128.0
    return s, s * 0.0 + 136.0  # derived from s, not tl.full: Triton then keeps GEMM_W's operand layout


@triton.jit
def _join8(d, BN: tl.constexpr):
    """8 operands [BN, 16] (d[j]: columns 16 j + q) → [BN, 128] in column order. A join appends a last
    dimension and a reshape flattens the first joined dimension most significantly: join on bit 2 of j,
    then bit 1, then bit 0."""
    e = tl.join(tl.join(d[0], d[4]), tl.join(d[2], d[6]))  # [BN, 16, 2, 2]: [q, j bit 2, j bit 1] (j even)
    o = tl.join(tl.join(d[1], d[5]), tl.join(d[3], d[7]))  # j odd
    a = tl.reshape(tl.join(e, o), [BN, 16, 8])  # [q, j]
    return tl.reshape(tl.permute(a, (0, 2, 1)), [BN, 128])


@_jit
def _gemm_w_kernel(
    x_ptr,  # [M, K]
    w_ptr,  # [N, KW] int32, word layout (KW = ceil(K / 128) * 16)
    s_ptr,  # [N, G]
    z_ptr,  # [N, G] uint8
    out_ptr,  # [SPLITS, M, N] fp32, or [M, N] in x's dtype
    M,
    N,
    K,
    KW,
    G,
    ITERS: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    GS: tl.constexpr,  # a multiple of 128
    ASYM: tl.constexpr,
    EVEN: tl.constexpr,  # K a whole number of tiles, every split full: no column masks
    SCALE_W: tl.constexpr,  # scale each weight before the dot (else the tile's partial sum after it)
    IEEE: tl.constexpr,
    ASM: tl.constexpr,  # nibbles to bf16 by inline PTX (bf16 activations on CUDA), else through fp32
    SZ: tl.constexpr,  # 0: scales s_ptr [N, G], zero points z_ptr [N, G]; 1 / 2: z_ptr is `pack_scale_zero`'s
    # int32 [G, N] (fp16 / bf16 scale bits over the zero point): contiguous, so Triton's pipeliner copies
    # it ahead asynchronously (separately, the 2- and 1-byte loads stalled every tile)
):
    """Swapped operands as GEMM_T: out^T [BN, BM] = W tile [BN, 128] @ x^T [128, BM]."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    sp = tl.program_id(2)
    nn = pid_n * BN + tl.arange(0, BN)
    mm = pid_m * BM + tl.arange(0, BM)
    qq = tl.arange(0, _WQ)
    kk = tl.arange(0, 128)
    n_ok = nn < N
    m_ok = mm < M
    row = (nn // _R) * (_R * KW) + (nn % _R) * _WQ
    acc = tl.zeros([BN, BM], tl.float32)
    for it in range(0, ITERS):
        t = sp * ITERS + it
        k0 = t * 128
        if SZ:
            v = tl.load(z_ptr + (k0 // GS) * N + nn, mask=n_ok & (k0 < K), other=0)
            sbits = (v >> 16).to(tl.int16)
            sdt: tl.constexpr = tl.float16 if SZ == 1 else tl.bfloat16
            s = sbits.to(sdt, bitcast=True).to(tl.float32)
            zz = (v & 0xFF).to(tl.float32) + 128.0
        else:
            s, zz = _scale_zero(s_ptr, z_ptr, nn * G + k0 // GS, n_ok & (k0 < K), ASYM)
        if EVEN:
            wm, xm = n_ok[:, None], m_ok[None, :]
        else:
            wm, xm = n_ok[:, None] & (k0 < K), m_ok[None, :] & (k0 + kk < K)[:, None]
        w = tl.load(w_ptr + row[:, None] + t * (_R * _WQ) + qq[None, :], mask=wm, other=0)  # [BN, 16]
        x = tl.load(x_ptr + mm[None, :] * K + (k0 + kk)[:, None], mask=xm, other=0.0)  # [128, BM]
        if ASM:
            nz = tl.broadcast_to(_bf16_bits(-zz)[:, None], w.shape)
            sc = tl.broadcast_to(_bf16_bits(s)[:, None], w.shape)  # read by the PTX only when SCALE_W
            d = tl.inline_asm_elementwise(
                _WORDS_PTX[SCALE_W], _WORDS_CONS, [w, nz, sc], dtype=(tl.bfloat16,) * 8, is_pure=True, pack=2
            )
            a = _join8(d, BN)
        else:  # [BN, 8, 16] codes: [n, j, q] is column 16 j + q, so the reshape is in column order
            c = (w[:, None, :] >> (4 * tl.arange(0, 8))[None, :, None]) & 0xF
            a = tl.reshape(c.to(tl.float32), [BN, 128]) - (zz - 128.0)[:, None]  # code - zero
            if SCALE_W:
                a = a * s[:, None]
            a = a.to(x.dtype)
        if SCALE_W:
            acc = _dot(a, x, acc, IEEE)
        else:
            acc += _dot(a, x, None, IEEE) * s[:, None]
    o_off = (sp * M + mm[None, :]) * N + nn[:, None]
    tl.store(out_ptr + o_off, acc.to(out_ptr.dtype.element_ty), mask=m_ok[None, :] & n_ok[:, None])


def _plane_ptx(j: int) -> str:
    """PTX for a word ($1) → its nibble j as fp32 128 + code ($0): a shift (none for nibble 4) and one lop3
    that masks the nibble at bits 16-19 and ORs in 0x43000000 (fp32 128.0); ptxas did not merge the and and
    the or of Triton's own code into one lop3."""
    shift = "" if j == 4 else f"{'shl' if j < 4 else 'shr'}.b32 t, $1, {abs(16 - 4 * j)};"
    return f"{{.reg .b32 t; {shift} lop3.b32 $0, {'$1' if j == 4 else 't'}, 0x000F0000, 0x43000000, 0xEA;}}"


_PLANE_PTX = tl.constexpr([_plane_ptx(j) for j in range(8)])


@triton.jit
def _plane(w, j: tl.constexpr, ASM: tl.constexpr):
    """Nibble j of int32 words [R, C] as fp32 128 + code, exact (inline PTX on CUDA, else Triton's shifts)."""
    if ASM:
        return tl.inline_asm_elementwise(_PLANE_PTX[j], "=r,r", [w], dtype=tl.float32, is_pure=True, pack=1)
    if j < 4:
        v = (w << (16 - 4 * j)) & 0x000F0000
    elif j == 4:
        v = w & 0x000F0000
    else:
        v = (w >> (4 * j - 16)) & 0x000F0000
    return (v | 0x43000000).to(tl.float32, bitcast=True)


@triton.jit
def _word_tile(
    w_ptr,
    s_ptr,
    z_ptr,
    row,
    nn,
    n_ok,
    t,
    K,
    G,
    GS: tl.constexpr,
    ASYM: tl.constexpr,
    EVEN: tl.constexpr,
    live,
):
    """Tile t of rows nn (row: their word offsets) in the word layout: (int32 words [R, 16], fp32 scales
    [R], fp32 128 + zero points [R]); nothing is read where `live` is false or the tile lies past K."""
    ok = n_ok & live if EVEN else n_ok & live & (t * 128 < K)
    w = tl.load(w_ptr + row[:, None] + t * (_R * _WQ) + tl.arange(0, _WQ)[None, :], mask=ok[:, None], other=0)
    s, zz = _scale_zero(s_ptr, z_ptr, nn * G + t * 128 // GS, ok, ASYM)
    return w, s, zz


@_jit
def _gemv_w_kernel(
    x_ptr,  # [M, K]
    w_ptr,  # [N, KW] int32, word layout
    s_ptr,  # [N, G]
    z_ptr,  # [N, G] uint8
    out_ptr,  # [SPLITS, M, N] fp32, or [M, N] in x's dtype
    M,
    N,
    K,
    KW,
    G,
    ITERS: tl.constexpr,
    BN: tl.constexpr,
    GS: tl.constexpr,  # a multiple of 128
    ASYM: tl.constexpr,
    EVEN: tl.constexpr,
    ASM: tl.constexpr,  # the nibble planes by inline PTX (CUDA), else Triton's shifts and masks
    PRE: tl.constexpr,  # load the next tile's words, scales and zero points one iteration ahead
):
    """One activation row per program (grid axis 2; meant for 1 row: more rows re-read the weights), no
    tensor cores, on the word layout. Per tile and weight row, 16 words (16-byte loads); nibble plane j is
    the [BN, 16] block of columns 16 j + q, so the products accumulate elementwise ([BN, 16], no reduction
    in the loop) and the sum over q happens once at the end. Per nibble: a shift and a lop3 give fp32
    128 + code (_plane), one fma; the 128 + zero part is subtracted per tile and row through the
    activations' column sums (in fp32: the codes' part is at most 16 times smaller, no precision lost
    that matters)."""
    pid_n = tl.program_id(0)
    sp = tl.program_id(1)
    m = tl.program_id(2)
    nn = pid_n * BN + tl.arange(0, BN)
    qq = tl.arange(0, _WQ)
    n_ok = nn < N
    row = (nn // _R) * (_R * KW) + (nn % _R) * _WQ
    acc = tl.zeros([BN, _WQ], tl.float32)
    if PRE:  # the first tile's codes, scales and zero points; each iteration then loads the next one's
        w_n, s_n, zz_n = _word_tile(
            w_ptr, s_ptr, z_ptr, row, nn, n_ok, sp * ITERS, K, G, GS, ASYM, EVEN, True
        )
    for it in range(0, ITERS):
        t = sp * ITERS + it
        k0 = t * 128
        if PRE:
            w, s, zz = w_n, s_n, zz_n
            live = it + 1 < ITERS
            w_n, s_n, zz_n = _word_tile(w_ptr, s_ptr, z_ptr, row, nn, n_ok, t + 1, K, G, GS, ASYM, EVEN, live)
        else:
            w, s, zz = _word_tile(w_ptr, s_ptr, z_ptr, row, nn, n_ok, t, K, G, GS, ASYM, EVEN, True)
        xp = x_ptr + m * K + k0 + qq  # [16]: column 16 j + q is xp + 16 j
        part = tl.zeros([BN, _WQ], tl.float32)
        xsum = tl.zeros([_WQ], tl.float32)
        for j in tl.static_range(8):  # nibble plane j: columns 16 j + q
            if EVEN:
                xj = tl.load(xp + 16 * j).to(tl.float32)
            else:
                xj = tl.load(xp + 16 * j, mask=k0 + 16 * j + qq < K, other=0.0).to(tl.float32)
            part += _plane(w, j, ASM) * xj[None, :]
            xsum += xj
        part -= zz[:, None] * xsum[None, :]  # the 128 + zero part, through the activations' sums
        acc += part * s[:, None]
    out = tl.sum(acc, axis=1)
    tl.store(out_ptr + (sp * M + m) * N + nn, out.to(out_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _dequant_w_kernel(
    w_ptr,  # [N, KW] int32, word layout
    s_ptr,  # [N, G]
    z_ptr,  # [N, G] uint8
    out_ptr,  # [N, K] in the activation dtype
    N,
    K,
    KW,
    G,
    BN: tl.constexpr,
    GS: tl.constexpr,  # any group size: the group is looked up per column
    ASYM: tl.constexpr,
):
    """One word tile (BN rows x 128 columns) → (code - zero) * scale in fp32, as qform.dequantize computes
    it, stored in out's dtype."""
    pid_n = tl.program_id(0)
    t = tl.program_id(1)
    nn = pid_n * BN + tl.arange(0, BN)
    kk = t * 128 + tl.arange(0, 128)
    n_ok = nn < N
    ok = n_ok[:, None] & (kk < K)[None, :]
    row = (nn // _R) * (_R * KW) + (nn % _R) * _WQ
    w = tl.load(
        w_ptr + row[:, None] + t * (_R * _WQ) + tl.arange(0, _WQ)[None, :], mask=n_ok[:, None], other=0
    )
    c = (w[:, None, :] >> (4 * tl.arange(0, 8))[None, :, None]) & 0xF  # [BN, 8, 16]: column 16 j + q
    c = tl.reshape(c, [BN, 128]).to(tl.float32)
    g = nn[:, None] * G + kk[None, :] // GS
    s = tl.load(s_ptr + g, mask=ok, other=0.0).to(tl.float32)
    if ASYM:
        a = (c - tl.load(z_ptr + g, mask=ok, other=0).to(tl.float32)) * s
    else:
        a = (c - 8.0) * s
    tl.store(out_ptr + nn[:, None] * K + kk[None, :], a.to(out_ptr.dtype.element_ty), mask=ok)


def dequant_words(w: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None, k: int, group_size: int, bn: int,
                  warps: int, dtype: torch.dtype) -> torch.Tensor:  # fmt: skip
    """The dense [N, k] weight in dtype from `pack_words`' layout (DEQUANT's first step)."""
    n, g = s.shape
    out = torch.empty(n, k, device=w.device, dtype=dtype)
    grid = (triton.cdiv(n, bn), triton.cdiv(k, WORD_COLS))
    zp = z if z is not None else s  # never read when symmetric
    _dequant_w_kernel[grid](
        w, s, zp, out, n, k, w.shape[1], g, BN=bn, GS=group_size, ASYM=z is not None, num_warps=warps
    )
    return out


@triton.jit
def _sum_splits_kernel(p_ptr, out_ptr, MN, SPLITS: tl.constexpr, BLOCK: tl.constexpr):
    """out [M*N] (x's dtype) = the sum of the SPLITS fp32 partials [SPLITS, M*N]: one launch where torch's
    sum and cast took two (about 0.38 ms of an 8B int4 step at 32 rows on an H200)."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < MN
    acc = tl.zeros([BLOCK], tl.float32)
    for sp in tl.static_range(SPLITS):
        acc += tl.load(p_ptr + sp * MN + i, mask=ok, other=0.0)
    tl.store(out_ptr + i, acc.to(out_ptr.dtype.element_ty), mask=ok)


def sum_splits(partials: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[splits, M, N] fp32 → [M, N] in dtype (split-K's last step, shared with runtime/triton_int8.py)."""
    splits, m, n = partials.shape
    out = torch.empty(m, n, device=partials.device, dtype=dtype)
    _sum_splits_kernel[(triton.cdiv(m * n, 1024),)](partials, out, m * n, SPLITS=splits, BLOCK=1024)
    return out


def launch(
    x: torch.Tensor,
    w: torch.Tensor,
    s: torch.Tensor,
    z: torch.Tensor | None,
    k: int,
    group_size: int,
    entry: list[int] | tuple[int, ...],
    sz: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [M, K] @ dequant(w).T with one plan entry (see ENTRY) → [M, N] in x's dtype. w: qform's packing
    for kinds GEMV / GEMM, `pack_tiles` for GEMV_T / GEMM_T, `pack_words` for GEMM_W / GEMV_W / DEQUANT; sz:
    `pack_scale_zero`'s, read by GEMM_W when the entry's option bit 5 asks (else s and z are)."""
    _, kind, bn, bk, splits, bm, warps = entry
    if kind == MMA:
        from lorafast_export.runtime import cuda_int4

        return cuda_int4.mma_mm(x, w, s, z, k, group_size, *cuda_int4.layout(entry))  # raises outside `fits`
    if kind == DEQUANT:
        return x @ dequant_words(w, s, z, k, group_size, bn, warps, x.dtype).T
    tiled = kind in (GEMV_T, GEMM_T)
    words = kind in (GEMM_W, GEMV_W)
    bk = WORD_COLS if words else tile_cols(group_size) if tiled else min(bk, group_size)
    u = 1 << (entry[3] >> 4 & 3) if tiled else 1  # tiles per loop iteration
    m, n, g = x.shape[0], s.shape[0], s.shape[1]  # w may hold padding rows
    tiles = triton.cdiv(triton.cdiv(k, bk), u)  # in steps of u tiles
    iters, splits, out = split_out(x, n, tiles, splits)
    zp = z if z is not None else s  # never read when symmetric
    args = (x, w, s, zp, out, m, n, k, w.shape[1], g)
    common = dict(ITERS=iters, BN=bn, GS=group_size, ASYM=z is not None, num_warps=warps)
    if kind == GEMV:
        _gemv_kernel[(triton.cdiv(n, bn), splits)](*args, MP=triton.next_power_of_2(m), BK=bk, **common)
    elif kind == GEMM:
        grid = (triton.cdiv(m, bm), triton.cdiv(n, bn), splits)
        _gemm_kernel[grid](*args, BM=bm, BK=bk, IEEE=x.dtype == torch.float32, **common)
    elif words:
        if entry[3] >> 1 & 7:
            common["num_stages"] = entry[3] >> 1 & 7
        common["EVEN"] = k % bk == 0 and tiles == iters * splits
        if kind == GEMV_W:
            grid = (triton.cdiv(n, bn), splits, m)
            _gemv_w_kernel[grid](*args, ASM=not _INTERPRET, PRE=bool(entry[3] & 16), **common)
            return out if splits == 1 else sum_splits(out, x.dtype)
        asm = x.dtype == torch.bfloat16 and not _INTERPRET  # the interpreter runs no PTX: the fp32 path
        packed_sz = sz is not None and bool(entry[3] & 32)
        if packed_sz:  # the scale and zero point in one int32 [G, N] (z_ptr), s_ptr unread
            args = (*args[:3], sz, *args[4:])
        opt = dict(SCALE_W=bool(entry[3] & 1), IEEE=x.dtype == torch.float32, ASM=asm)
        opt["SZ"] = (1 if s.dtype == torch.float16 else 2) if packed_sz else 0
        grid = (triton.cdiv(n, bn), triton.cdiv(m, bm), splits)
        _gemm_w_kernel[grid](*args, BM=bm, **opt, **common)
    else:
        opts = entry[3]  # bit 0: scale per weight (GEMM_T); bits 1-3: pipeline stages (0: Triton's default);
        # bits 4-5: log2 tiles per iteration; bit 6: nibbles by inline PTX (GEMM_T, CUDA)
        if opts >> 1 & 7:
            common["num_stages"] = opts >> 1 & 7
        common["EVEN"] = k % bk == 0 and triton.cdiv(k, bk) % u == 0 and tiles == iters * splits
        if kind == GEMV_T:
            grid = (triton.cdiv(n, bn), splits)
            _gemv_t_kernel[grid](*args, MP=triton.next_power_of_2(m), T=bk, U=u, **common)
        else:
            grid = (triton.cdiv(n, bn), triton.cdiv(m, bm), splits)
            # inline PTX for bf16 activations on the GPU; the interpreter runs no PTX: the fp32 path there
            asm = bool(opts & 64) and x.dtype == torch.bfloat16 and not _INTERPRET
            opt = dict(SCALE_W=bool(opts & 1), IEEE=x.dtype == torch.float32, ASM=asm)
            _gemm_t_kernel[grid](*args, BM=bm, T=bk, U=u, **opt, **common)
    return out if splits == 1 else sum_splits(out, x.dtype)


def pick(plan: list[int], rows: int) -> list[int]:
    """The plan entry for `rows`: the first whose max rows covers it, else the last."""
    entries = [plan[i : i + ENTRY] for i in range(0, len(plan), ENTRY)]
    return next((e for e in entries if rows <= e[0]), entries[-1])


@torch.library.custom_op("lorafast::int4_mm", mutates_args=())
def int4_mm(
    x: torch.Tensor,
    w: torch.Tensor | None,
    s: torch.Tensor,
    z: torch.Tensor | None,
    k: int,
    group_size: int,
    plan: list[int],
    tg_w: torch.Tensor | None = None,
    tg_sz: torch.Tensor | None = None,
    w_tiled: torch.Tensor | None = None,
    w_words: torch.Tensor | None = None,
    sz_words: torch.Tensor | None = None,
    w_frags: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [M, k] → [M, N] with the kernel the plan gives for M rows (plan: flattened ENTRY-long entries;
    w: qform's packing, for kinds GEMV / GEMM; w_tiled: `pack_tiles`, for GEMV_T / GEMM_T; tg_w / tg_sz:
    the tinygemm packing, for TINYGEMM; w_words: `pack_words`, for GEMM_W / GEMV_W / DEQUANT; sz_words:
    `pack_scale_zero`, for GEMM_W entries with option bit 5; w_frags: runtime/cuda_int4.py's
    `pack_frags`, for MMA; a layer holds only the packings
    its plan uses). The choice happens
    here, inside the op, so a compiled graph does not branch on the (dynamic) row count."""
    entry = pick(plan, x.shape[0])
    kind = entry[1]
    if kind == TINYGEMM:
        return tinygemm_mm(x, tg_w, group_size, tg_sz)
    packed = (
        w_frags
        if kind == MMA
        else w_words
        if kind in WORD_KINDS
        else w_tiled
        if kind in (GEMV_T, GEMM_T)
        else w
    )
    return launch(x.contiguous(), packed, s, z, k, group_size, entry, sz_words)


@int4_mm.register_fake
def _(
    x,
    w,
    s,
    z,
    k,
    group_size,
    plan,
    tg_w=None,
    tg_sz=None,
    w_tiled=None,
    w_words=None,
    sz_words=None,
    w_frags=None,
):
    return x.new_empty(x.shape[0], s.shape[0])
