"""SmoothQuant W8A8 in Triton: a GEMV for a decode step's few rows and a GEMM for prefills, the scales in the
epilogue.

y[m, n] = sx[m] * sw[n] * sum_k xq[m, k] * wq[n, k], with xq the activations' int8 codes (qform.int8_per_token),
wq the weights' int8 codes [N, K] (row-major, as W8A8Linear holds them), exact int32 sums, the two float32
scales applied once to each output before its one rounding to the output dtype, in the order W8A8Linear's
cuBLAS path applies them.
- GEMM: `tl.dot` of int8 tiles on the tensor cores; at a decode batch's 2-16 rows 16-row tiles with split K.
  cuBLAS's int8 GEMM (`torch._int_mm`) was no faster than bf16 from 256 rows on an H100 and leaves an int32
  [M, N] for a second kernel to scale (bench/TORCH.md, session 34); at 2-16 rows it takes more than 16 rows (a
  padded copy) and its layers took 1.1-1.3x ours (session 35); at 17-31 rows W8A8Linear keeps it (it beat the
  16-row tiles at 24). Tiles from the row count (`TILES`, measured).
- GEMV (GEMV_ROWS: one row, a batch-1 decode step; session 35): no tensor cores; each K tile's products summed in float32, exact
  (|x| <= 127, |w| <= 128, BK <= 1024 terms: every partial sum an integer below 2**24), then added to an int32
  accumulator; split K over SMs (int32 partials, summed and scaled by a second kernel). cuBLAS's int8 GEMM takes
  more than 16 rows, so a decode step padded its 1-16 rows to 17+ and read the weight at ~1.4 TB/s.
Triton is imported only here (CUDA, or its interpreter in tests); the op is a torch custom op, opaque to
inductor.
"""

import functools

import torch
import triton
import triton.language as tl


@triton.jit
def _w8a8_kernel(
    x_ptr,  # [M, K] int8 activation codes
    w_ptr,  # [N, K] int8 weight codes
    sx_ptr,  # [M] float32 token scales
    sw_ptr,  # [N] float32 channel scales
    out_ptr,  # [M, N] in the output dtype with one split, else int32 partials [SPLITS, M, N]
    M,
    N,
    K,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    GROUP_M: tl.constexpr,
    ITERS: tl.constexpr,  # K tiles per split: a compile-time bound (Triton's interpreter cannot loop to a runtime one)
    WIDE: tl.constexpr,  # 64-bit offsets
    SPLITS: tl.constexpr,  # split K (a few rows: fill the SMs), summed and scaled by _w8a8_splits_kernel
):
    pid = tl.program_id(0)
    if SPLITS == 1:
        k0 = 0  # one split: the kernel as measured for prefills (session 34)
    else:
        k0 = tl.program_id(1) * ITERS * BK
    grid_m, grid_n = tl.cdiv(M, BM), tl.cdiv(N, BN)
    width = GROUP_M * grid_n  # GROUP_M row tiles share each weight tile while it is in L2
    first_m = (pid // width) * GROUP_M
    rows_in_group = min(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % rows_in_group
    pid_n = (pid % width) // rows_in_group
    mm = pid_m * BM + tl.arange(0, BM)
    nn = pid_n * BN + tl.arange(0, BN)
    kk = tl.arange(0, BK)
    if WIDE:  # offsets past 2**31 (a long prefill's [M, N]); the measured kernel's are 32-bit
        mm, nn = mm.to(tl.int64), nn.to(tl.int64)
    x_ptrs = x_ptr + mm[:, None] * K + (k0 + kk)[None, :]
    w_ptrs = w_ptr + nn[None, :] * K + (k0 + kk)[:, None]  # [BK, BN]: the weight tile transposed
    acc = tl.zeros((BM, BN), dtype=tl.int32)
    for i in range(ITERS):
        k_ok = k0 + kk + i * BK < K
        a = tl.load(x_ptrs, mask=(mm[:, None] < M) & k_ok[None, :], other=0)
        b = tl.load(w_ptrs, mask=(nn[None, :] < N) & k_ok[:, None], other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        x_ptrs += BK
        w_ptrs += BK
    ok = (mm[:, None] < M) & (nn[None, :] < N)
    if SPLITS == 1:
        sx = tl.load(sx_ptr + mm, mask=mm < M, other=0.0)
        sw = tl.load(sw_ptr + nn, mask=nn < N, other=0.0)
        y = acc.to(tl.float32) * sx[:, None] * sw[None, :]
        tl.store(out_ptr + mm[:, None] * N + nn[None, :], y.to(out_ptr.dtype.element_ty), mask=ok)
    else:
        tl.store(out_ptr + (tl.program_id(1) * M + mm[:, None]) * N + nn[None, :], acc, mask=ok)


@triton.jit
def _w8a8_gemv_kernel(
    x_ptr,  # [M, K] int8 activation codes
    w_ptr,  # [N, K] int8 weight codes
    sx_ptr,  # [M] float32 token scales
    sw_ptr,  # [N] float32 channel scales
    out_ptr,  # [M, N] in the output dtype with one split, else int32 partials [SPLITS, M, N]
    M,
    N,
    K,
    ITERS: tl.constexpr,  # K tiles per split
    MP: tl.constexpr,  # M padded to a power of two
    BN: tl.constexpr,
    BK: tl.constexpr,  # <= 1024: a tile's float32 sums stay exact
    SPLITS: tl.constexpr,
):
    pid_n = tl.program_id(0)
    sp = tl.program_id(1)
    nn = pid_n * BN + tl.arange(0, BN)
    mm = tl.arange(0, MP)
    kk = tl.arange(0, BK)
    n_ok = nn < N
    acc = tl.zeros([MP, BN], tl.int32)
    for it in range(0, ITERS):
        k0 = (sp * ITERS + it) * BK  # tiles past K load nothing (masked)
        k_ok = k0 + kk < K
        w = tl.load(w_ptr + nn[:, None] * K + (k0 + kk)[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0)
        # [BN, BK] as float32 without an int-to-float conversion (quarter rate on Hopper): code + 128 | 0x4B000000,
        # read as float32, is 2**23 + code + 128
        wf = ((w.to(tl.int32) + 128) | 0x4B000000).to(tl.float32, bitcast=True) - 8388736.0
        for m in tl.static_range(MP):
            x = tl.load(x_ptr + m * K + k0 + kk, mask=k_ok & (m < M), other=0).to(tl.float32)
            part = tl.sum(wf * x[None, :], axis=1).to(tl.int32)  # an exact integer
            acc += tl.where(mm[:, None] == m, part[None, :], 0)
    ok = (mm < M)[:, None] & n_ok[None, :]
    if SPLITS == 1:
        sx = tl.load(sx_ptr + mm, mask=mm < M, other=0.0)
        sw = tl.load(sw_ptr + nn, mask=n_ok, other=0.0)
        y = acc.to(tl.float32) * sx[:, None] * sw[None, :]
        tl.store(out_ptr + mm[:, None] * N + nn[None, :], y.to(out_ptr.dtype.element_ty), mask=ok)
    else:
        tl.store(out_ptr + (sp * M + mm[:, None]) * N + nn[None, :], acc, mask=ok)


@triton.jit
def _w8a8_splits_kernel(p_ptr, sx_ptr, sw_ptr, out_ptr, M, N, SPLITS: tl.constexpr, BLOCK: tl.constexpr):
    """out [M, N] = (the SPLITS int32 partials' sum, exact) * sx[m] * sw[n], rounded once to out's dtype."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < M * N
    acc = tl.zeros([BLOCK], tl.int32)
    for sp in tl.static_range(SPLITS):
        acc += tl.load(p_ptr + sp * M * N + i, mask=ok, other=0)
    sx = tl.load(sx_ptr + i // N, mask=ok, other=0.0)
    sw = tl.load(sw_ptr + i % N, mask=ok, other=0.0)
    tl.store(out_ptr + i, (acc.to(tl.float32) * sx * sw).to(out_ptr.dtype.element_ty), mask=ok)


GEMV_ROWS = 1  # w8a8_mm runs the GEMV up to here: at 2 and 4 rows it was slower than cuBLAS's padded GEMM
# (H100, bench/TORCH.md session 35), and the 16-row GEMM tiles are faster still
# the int8 weight-only GEMV's measured tile at one row (int8 tables); where K is split, the fastest of 48 tiles on
# the 8B qkv, o and down (H100, session 35 call 4)
GEMV_BN, GEMV_BK, GEMV_WARPS = 32, 256, 4
SPLIT_BN, SPLIT_BK = 16, 512


def gemv_splits(n: int, k: int, sms: int | None) -> int:
    """Split K until the GEMV has three programs per SM or more (at most 8 splits, two K tiles each at
    least): on the 8B shapes 4 for qkv, o and down and 1 for gate_up, the int8 tables' one-row winners."""
    tiles, splits = triton.cdiv(n, GEMV_BN), 1
    while sms and tiles * splits < 3 * sms and splits < 8 and k // GEMV_BK >= 4 * splits:
        splits *= 2
    return splits


def gemv_config(n: int, k: int, sms: int | None) -> tuple[int, int, int, int]:
    """(BN, BK, splits, warps) for an [n, k] weight at one row: 32 x 256 tiles where they fill the GPU (gate_up
    at 8B: the fastest measured), else split K and 16 x 512 tiles (qkv, o, down: 10.4-25.3 against 11.3-28.2 us
    with 32 x 256 on an H100, session 35 call 4)."""
    splits = gemv_splits(n, k, sms)
    return (GEMV_BN, GEMV_BK, 1, GEMV_WARPS) if splits == 1 else (SPLIT_BN, SPLIT_BK, splits, GEMV_WARPS)


def gemv(
    xq: torch.Tensor,
    w: torch.Tensor,
    sx: torch.Tensor,
    sw: torch.Tensor,
    dtype: torch.dtype,
    config: tuple[int, int, int, int] | None = None,
) -> torch.Tensor:
    """The GEMV: xq [M, K] int8 (a few rows), w [N, K] int8, sx [M] or [M, 1], sw [N] float32 → [M, N] in
    dtype. config: (BN, BK, splits, warps)."""
    m, k = xq.shape
    n = w.shape[0]
    bn, bk, splits, warps = config or gemv_config(n, k, _sms(xq.device))
    assert bk <= 1024, "a GEMV tile's float32 sums are exact up to 1,024 terms"
    iters, splits, out = _split_out(m, n, triton.cdiv(k, bk), splits, xq.device, dtype)
    sx = sx.reshape(m)
    _w8a8_gemv_kernel[(triton.cdiv(n, bn), splits)](
        xq, w, sx, sw, out, m, n, k, ITERS=iters, MP=triton.next_power_of_2(m), BN=bn, BK=bk, SPLITS=splits,
        num_warps=warps,
    )  # fmt: skip
    return _sum_splits(out, sx, sw, dtype)


def _split_out(
    m: int, n: int, tiles: int, splits: int, device, dtype: torch.dtype
) -> tuple[int, int, torch.Tensor]:
    """Split-K of `tiles` K tiles into at most `splits`, each holding a tile: (tiles per split, splits, the
    kernel's output: [M, N] in dtype with one split, else the int32 partials [splits, M, N] for _sum_splits)."""
    iters = triton.cdiv(tiles, splits)
    splits = triton.cdiv(tiles, iters)
    shape, dt = ((m, n), dtype) if splits == 1 else ((splits, m, n), torch.int32)
    return iters, splits, torch.empty(shape, device=device, dtype=dt)


def _sum_splits(out: torch.Tensor, sx: torch.Tensor, sw: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The kernel's output as [M, N] in dtype: itself with one split, else its partials summed and scaled."""
    if out.dim() == 2:
        return out
    splits, m, n = out.shape
    y = torch.empty(m, n, device=out.device, dtype=dtype)
    _w8a8_splits_kernel[(triton.cdiv(m * n, 1024),)](out, sx, sw, y, m, n, SPLITS=splits, BLOCK=1024)
    return y


TILES = (  # (most rows, (BM, BN, BK, GROUP_M, warps, stages), splits): at 2-16 rows the least summed time over
    # the 8B model's four linears among 32 configs of 16-row tiles (session 35, call 6); from 32 rows among nine
    # configs at 32-64, 128-256 and 1,024-4,096 rows (session 34), all on an H100
    (16, (16, 64, 256, 1, 4, 3), 4),
    (64, (64, 128, 256, 8, 4, 3), 1),
    (256, (64, 128, 128, 8, 4, 4), 1),
    (1 << 62, (256, 128, 128, 8, 8, 3), 1),
)


def tiles(m: int, smem: int | None = None) -> tuple[tuple[int, int, int, int, int, int], int]:
    """((BM, BN, BK, GROUP_M, warps, stages), K splits) for m rows; with `smem` (bytes of shared memory a block
    may use), fewer stages where a GPU has less than the H100 the table was measured on (each stage holds a
    BM x BK and a BK x BN int8 tile)."""
    (bm, bn, bk, group_m, warps, stages), splits = next((c, sp) for most, c, sp in TILES if m <= most)
    while smem is not None and stages > 1 and stages * (bm + bn) * bk > smem:
        stages -= 1
    return (bm, bn, bk, group_m, warps, stages), splits


def _wide(m: int, n: int, k: int) -> bool:
    """Whether an offset into [M, K] or [M, N] may pass 2**31 (the kernel then offsets in 64 bits)."""
    return m * max(n, k) >= 2**31


@functools.cache
def _smem(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    return getattr(torch.cuda.get_device_properties(device), "shared_memory_per_block_optin", None)


@functools.cache
def _sms(device: torch.device) -> int | None:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else None


def launch(
    xq: torch.Tensor,
    w: torch.Tensor,
    sx: torch.Tensor,
    sw: torch.Tensor,
    dtype: torch.dtype,
    config: tuple[int, int, int, int, int, int] | None = None,
    splits: int = 1,
) -> torch.Tensor:
    """xq [M, K] int8, w [N, K] int8, sx [M] or [M, 1] float32, sw [N] float32 → [M, N] in `dtype`; `splits`
    splits K (int32 partials, then _w8a8_splits_kernel). No config: the rule's tiles and splits for M."""
    m, k = xq.shape
    n = w.shape[0]
    if config is None:
        config, splits = tiles(m, _smem(xq.device))
    bm, bn, bk, group_m, warps, stages = config
    iters, splits, out = _split_out(m, n, triton.cdiv(k, bk), splits, xq.device, dtype)
    sx = sx.reshape(m)
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn), splits)
    _w8a8_kernel[grid](
        xq, w, sx, sw, out, m, n, k, BM=bm, BN=bn, BK=bk, GROUP_M=group_m, ITERS=iters,
        WIDE=_wide(m, n, k), SPLITS=splits, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return _sum_splits(out, sx, sw, dtype)


@torch.library.custom_op("lorafast::w8a8_mm", mutates_args=())
def w8a8_mm(
    xq: torch.Tensor, w: torch.Tensor, sx: torch.Tensor, sw: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """gemv() up to GEMV_ROWS rows, else launch(), as an op a compiled graph calls (the choice and the tile
    rule run inside, on the dynamic row count)."""
    if xq.shape[0] <= GEMV_ROWS:
        return gemv(xq.contiguous(), w, sx.contiguous(), sw, dtype)
    return launch(xq.contiguous(), w, sx.contiguous(), sw, dtype)


@w8a8_mm.register_fake
def _(xq, w, sx, sw, dtype):
    return xq.new_empty(xq.shape[0], w.shape[0], dtype=dtype)
