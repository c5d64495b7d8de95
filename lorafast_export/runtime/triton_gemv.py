"""A dense GEMV for a few rows (decode at batch 1, a speculative verify of k + 1 tokens): y = x W^T.

cuBLAS's M = 1 kernels read the 8B's small linears at 3.1-3.3 TB/s and add a split-K reduce kernel to
o_proj and down_proj (bench/TORCH.md, session 6 profile). Here each program owns BN output columns over
the whole K: no split, no second kernel. Every row of x runs the same sequence of operations whatever the
number of rows (each row keeps its own [BN, BK] accumulator, summed over K once at the end), so row i of
a 5-row call is meant to equal the 1-row call bit for bit: the property a speculative verify needs to give
the plain step's tokens (checked on the CPU through the interpreter; on CUDA by bench/torch_bench.py's
`gemv` section).

Triton is imported only here (CUDA, or its interpreter in tests: TRITON_INTERPRET=1 before the import).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import nn

MAX_ROWS = 8  # rows one call takes (a verify of k + 1 <= 8 tokens per row); more: F.linear


@triton.jit
def _gemv_kernel(
    x_ptr,  # [M, K]
    w_ptr,  # [N, K] row-major
    y_ptr,  # [M, N]
    M,
    N,
    K,
    ITERS: tl.constexpr,  # cdiv(K, BK)
    MP: tl.constexpr,  # M padded to a power of two
    BN: tl.constexpr,
    BK: tl.constexpr,
    EVEN: tl.constexpr,  # N % BN == 0 and K % BK == 0: no masks
):
    pid = tl.program_id(0)
    rn = pid * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    rm = tl.arange(0, MP)
    acc = tl.zeros([MP, BN, BK], tl.float32)
    for it in range(0, ITERS):
        kk = it * BK + rk
        if EVEN:
            w = tl.load(w_ptr + rn[:, None] * K + kk[None, :])
            x = tl.load(x_ptr + rm[:, None] * K + kk[None, :], mask=(rm < M)[:, None], other=0.0)
        else:
            w = tl.load(
                w_ptr + rn[:, None] * K + kk[None, :], mask=(rn < N)[:, None] & (kk < K)[None, :], other=0.0
            )
            x = tl.load(
                x_ptr + rm[:, None] * K + kk[None, :], mask=(rm < M)[:, None] & (kk < K)[None, :], other=0.0
            )
        acc += w.to(tl.float32)[None, :, :] * x.to(tl.float32)[:, None, :]
    y = tl.sum(acc, 2)
    tl.store(
        y_ptr + rm[:, None] * N + rn[None, :],
        y.to(y_ptr.dtype.element_ty),
        mask=(rm < M)[:, None] & (rn < N)[None, :],
    )


GEMV_TILES = [(8, 128, 4), (16, 128, 4), (4, 256, 4), (8, 256, 4), (16, 256, 8), (32, 64, 4)]  # swept


def gemv_config(n: int, k: int) -> tuple[int, int, int]:
    """(BN, BK, warps) for a [n, k] weight, whatever the row count. Registers: MP x BN x BK accumulators
    over 32 x warps threads (64 per thread at 8 rows here)."""
    return 8, 128, 4


def gemv_launch(x: torch.Tensor, w: torch.Tensor, bn: int, bk: int, warps: int) -> torch.Tensor:
    """x [M <= MAX_ROWS, K] @ w[N, K]^T → [M, N] in x's dtype, with the given tiles."""
    m, k = x.shape
    n = w.shape[0]
    if m > MAX_ROWS or w.shape[1] != k:
        raise ValueError(f"gemv: x {tuple(x.shape)} and w {tuple(w.shape)} (at most {MAX_ROWS} rows)")
    x, w = x.contiguous(), w.contiguous()
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    _gemv_kernel[(triton.cdiv(n, bn),)](
        x,
        w,
        y,
        m,
        n,
        k,
        ITERS=triton.cdiv(k, bk),
        MP=triton.next_power_of_2(max(m, 1)),
        BN=bn,
        BK=bk,
        EVEN=n % bn == 0 and k % bk == 0,
        num_warps=warps,
    )
    return y


@torch.library.custom_op("lorafast::gemv", mutates_args=())
def gemv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [M <= MAX_ROWS, K] @ w[N, K]^T → [M, N] (x's dtype), tiles from gemv_config (they depend on the
    weight's shape only, never on M: row i of the result does not depend on the other rows)."""
    return gemv_launch(x, w, *gemv_config(*w.shape))


@gemv.register_fake
def _(x, w):
    return x.new_empty(x.shape[0], w.shape[0])


class GemvLinear(nn.Linear):
    """An nn.Linear whose products of <= MAX_ROWS rows run the GEMV above (others: F.linear). The row
    count is a static shape under torch.compile, so each compiled graph holds one of the two paths."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if rows > MAX_ROWS or rows == 0:
            return F.linear(x, self.weight, self.bias)
        y = gemv(x.reshape(rows, x.shape[-1]), self.weight).reshape(*x.shape[:-1], -1)
        return y if self.bias is None else y + self.bias


def use_gemv(root: nn.Module) -> int:
    """Every plain nn.Linear under root (the fused qkv/gate_up, o_proj, down_proj, an untied lm_head)
    becomes a GemvLinear in place (same parameters); returns how many. Quantized linears are not
    nn.Linear and keep their kernels."""
    n = 0
    for m in root.modules():
        if type(m) is nn.Linear:
            m.__class__ = GemvLinear
            n += 1
    return n
