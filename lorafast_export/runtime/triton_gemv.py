"""A dense GEMV for a few rows (decode at batch 1, a speculative verify of k + 1 tokens): y = x W^T.

Each program owns one row of x and BN output columns over the whole K: no split, no second kernel, and
row i of a 5-row call is computed by the same operations as the 1-row call, so it equals it bit for bit:
the property a speculative verify needs to give the plain step's tokens (CPU: the interpreter, tests;
CUDA: bench/torch_bench.py's `gemv` section, every tile true in session 7's call A). It is not faster than
cuBLAS: at 1 row it matches cuBLAS on qkv and o_proj and is 8-22% slower on gate_up and down_proj (call A).

Triton is imported only here (CUDA, or its interpreter in tests: TRITON_INTERPRET=1 before the import).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import nn

from lorafast_export.model.decoder import RMSNorm

MAX_ROWS = 8  # rows one call takes (a verify of k + 1 <= 8 tokens per row); more: F.linear


@triton.jit
def _gemv_kernel(
    x_ptr,  # [M, K]
    w_ptr,  # [N, K] row-major
    y_ptr,  # [M, N]
    N,
    K,
    ITERS: tl.constexpr,  # cdiv(K, BK)
    BN: tl.constexpr,
    BK: tl.constexpr,
    EVEN: tl.constexpr,  # N % BN == 0 and K % BK == 0: no masks
):
    """Program (m, j): row m of x against weight rows j*BN..j*BN+BN-1 over the whole K. The rows of one
    weight tile are consecutive programs (axis 0), so a tile read for row 0 is in L2 for the others."""
    m = tl.program_id(0)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    acc = tl.zeros([BN, BK], tl.float32)
    for it in range(0, ITERS):
        kk = it * BK + rk
        if EVEN:
            w = tl.load(w_ptr + rn[:, None] * K + kk[None, :])
            x = tl.load(x_ptr + m * K + kk)
        else:
            w = tl.load(
                w_ptr + rn[:, None] * K + kk[None, :], mask=(rn < N)[:, None] & (kk < K)[None, :], other=0.0
            )
            x = tl.load(x_ptr + m * K + kk, mask=kk < K, other=0.0)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    y = tl.sum(acc, 1)
    tl.store(y_ptr + m * N + rn, y.to(y_ptr.dtype.element_ty), mask=rn < N)


GEMV_TILES = [(4, 256, 4), (16, 128, 4), (2, 512, 4), (8, 256, 8), (4, 512, 4), (8, 128, 4)]  # swept


def gemv_config(n: int, k: int) -> tuple[int, int, int]:
    """(BN, BK, warps) for a [n, k] weight, whatever the row count: H200 call A (session 7) at 1 row,
    the fastest of GEMV_TILES per 8B linear (4 x 256 for qkv, o_proj, down_proj; 16 x 128 for gate_up
    and the lm_head)."""
    return (16, 128, 4) if n >= 16384 else (4, 256, 4)


def gemv_launch(x: torch.Tensor, w: torch.Tensor, bn: int, bk: int, warps: int) -> torch.Tensor:
    """x [M <= MAX_ROWS, K] @ w[N, K]^T → [M, N] in x's dtype, with the given tiles. Row m is computed by
    the programs (m, *) alone, by the same operations whatever M is."""
    m, k = x.shape
    n = w.shape[0]
    if m > MAX_ROWS or w.shape[1] != k:
        raise ValueError(f"gemv: x {tuple(x.shape)} and w {tuple(w.shape)} (at most {MAX_ROWS} rows)")
    x, w = x.contiguous(), w.contiguous()
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    _gemv_kernel[(m, triton.cdiv(n, bn))](
        x,
        w,
        y,
        n,
        k,
        ITERS=triton.cdiv(k, bk),
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


@triton.jit
def _rmsnorm_kernel(x_ptr, w_ptr, y_ptr, H, eps, BLOCK: tl.constexpr):
    """One program per row: the whole row in one block, so its sum of squares is reduced the same way
    whatever the number of rows (inductor's and torch's own reductions pick their launch by row count)."""
    r = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    ok = cols < H
    h = tl.load(x_ptr + r * H + cols, mask=ok, other=0.0).to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(h * h, 0) / H + eps)
    y = (h * inv).to(x_ptr.dtype.element_ty).to(tl.float32)  # the canonical RMSNorm: h.to(dtype) first
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + r * H + cols, (w * y).to(y_ptr.dtype.element_ty), mask=ok)


@torch.library.custom_op("lorafast::rmsnorm", mutates_args=())
def rmsnorm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """model.decoder.RMSNorm of x [R, H] with weight w [H], row-count invariant (see _rmsnorm_kernel)."""
    r, h = x.shape
    y = torch.empty(r, h, device=x.device, dtype=torch.promote_types(x.dtype, w.dtype))
    block = triton.next_power_of_2(h)
    _rmsnorm_kernel[(r,)](x.contiguous(), w, y, h, eps, BLOCK=block, num_warps=8 if block >= 2048 else 4)
    return y


@rmsnorm.register_fake
def _(x, w, eps):
    return x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, w.dtype))


class InvariantRMSNorm(RMSNorm):
    """model.decoder.RMSNorm through the row-count-invariant kernel above."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.shape[-1]
        return rmsnorm(x.reshape(-1, h), self.weight, self.eps).reshape(x.shape)


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
    becomes a GemvLinear, and every RMSNorm an InvariantRMSNorm, in place (same parameters); returns how
    many linears. Quantized linears are not nn.Linear and keep their kernels."""
    n = 0
    for m in root.modules():
        if type(m) is nn.Linear:
            m.__class__ = GemvLinear
            n += 1
        elif type(m) is RMSNorm:
            m.__class__ = InvariantRMSNorm
    return n
