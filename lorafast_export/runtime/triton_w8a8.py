"""SmoothQuant W8A8 at prefill row counts: one Triton int8 GEMM with the scales in its epilogue.

y[m, n] = sx[m] * sw[n] * sum_k xq[m, k] * wq[n, k], with xq the activations' int8 codes (qform.int8_per_token),
wq the weights' int8 codes [N, K] (row-major, as W8A8Linear holds them), int32 sums on the tensor cores
(`tl.dot` of int8 tiles: exact), the two float32 scales applied once to each output before its one rounding
to the output dtype. cuBLAS's int8 GEMM (`torch._int_mm`) was no faster than bf16 from 256 rows on an H100
and leaves an int32 [M, N] for a second kernel to scale (bench/TORCH.md, session 34); decode's few rows keep
it (W8A8Linear). Tiles from the row count (`TILES`, measured). Triton is imported only here (CUDA, or its
interpreter in tests); the op is a torch custom op, opaque to inductor.
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
    out_ptr,  # [M, N]
    M,
    N,
    K,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    GROUP_M: tl.constexpr,
    ITERS: tl.constexpr,  # cdiv(K, BK): a compile-time bound (Triton's interpreter cannot loop to a runtime one)
    WIDE: tl.constexpr,  # 64-bit offsets
):
    pid = tl.program_id(0)
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
    x_ptrs = x_ptr + mm[:, None] * K + kk[None, :]
    w_ptrs = w_ptr + nn[None, :] * K + kk[:, None]  # [BK, BN]: the weight tile transposed
    acc = tl.zeros((BM, BN), dtype=tl.int32)
    for i in range(ITERS):
        k_ok = kk + i * BK < K
        a = tl.load(x_ptrs, mask=(mm[:, None] < M) & k_ok[None, :], other=0)
        b = tl.load(w_ptrs, mask=(nn[None, :] < N) & k_ok[:, None], other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        x_ptrs += BK
        w_ptrs += BK
    sx = tl.load(sx_ptr + mm, mask=mm < M, other=0.0)
    sw = tl.load(sw_ptr + nn, mask=nn < N, other=0.0)
    y = acc.to(tl.float32) * sx[:, None] * sw[None, :]
    ok = (mm[:, None] < M) & (nn[None, :] < N)
    tl.store(out_ptr + mm[:, None] * N + nn[None, :], y.to(out_ptr.dtype.element_ty), mask=ok)


TILES = (  # (most rows, (BM, BN, BK, GROUP_M, warps, stages)): the least summed time over the 8B model's four
    # linears among nine configs at 32-64, 128-256 and 1,024-4,096 rows on an H100 (bench/TORCH.md, session 34)
    (64, (64, 128, 256, 8, 4, 3)),
    (256, (64, 128, 128, 8, 4, 4)),
    (1 << 62, (256, 128, 128, 8, 8, 3)),
)


def tiles(m: int, smem: int | None = None) -> tuple[int, int, int, int, int, int]:
    """(BM, BN, BK, GROUP_M, warps, stages) for m rows; with `smem` (bytes of shared memory a block may use),
    fewer stages where a GPU has less than the H100 the table was measured on (each stage holds a BM x BK and
    a BK x BN int8 tile)."""
    bm, bn, bk, group_m, warps, stages = next(c for most, c in TILES if m <= most)
    while smem is not None and stages > 1 and stages * (bm + bn) * bk > smem:
        stages -= 1
    return bm, bn, bk, group_m, warps, stages


def _wide(m: int, n: int, k: int) -> bool:
    """Whether an offset into [M, K] or [M, N] may pass 2**31 (the kernel then offsets in 64 bits)."""
    return m * max(n, k) >= 2**31


@functools.cache
def _smem(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    return getattr(torch.cuda.get_device_properties(device), "shared_memory_per_block_optin", None)


def launch(
    xq: torch.Tensor,
    w: torch.Tensor,
    sx: torch.Tensor,
    sw: torch.Tensor,
    dtype: torch.dtype,
    config: tuple[int, int, int, int, int, int] | None = None,
) -> torch.Tensor:
    """xq [M, K] int8, w [N, K] int8, sx [M] or [M, 1] float32, sw [N] float32 → [M, N] in `dtype`."""
    m, k = xq.shape
    n = w.shape[0]
    bm, bn, bk, group_m, warps, stages = config or tiles(m, _smem(xq.device))
    out = torch.empty(m, n, device=xq.device, dtype=dtype)
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    _w8a8_kernel[grid](
        xq, w, sx.reshape(m), sw, out, m, n, k, BM=bm, BN=bn, BK=bk, GROUP_M=group_m,
        ITERS=triton.cdiv(k, bk), WIDE=_wide(m, n, k), num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return out


@torch.library.custom_op("lorafast::w8a8_mm", mutates_args=())
def w8a8_mm(
    xq: torch.Tensor, w: torch.Tensor, sx: torch.Tensor, sw: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """launch() as an op a compiled graph calls (the tile rule runs inside, on the dynamic row count)."""
    return launch(xq.contiguous(), w, sx.contiguous(), sw, dtype)


@w8a8_mm.register_fake
def _(xq, w, sx, sw, dtype):
    return xq.new_empty(xq.shape[0], w.shape[0], dtype=dtype)
