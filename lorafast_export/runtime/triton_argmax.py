"""The greedy argmax of a step's logits as two small Triton kernels (runtime option `triton_argmax`).

Why: torch's argmax of one [1, V] row runs a single thread block over the whole row. Over the 128,256 logits of an
8B decode step that kernel took 0.03 ms on the H200 (bench/TORCH.md, sessions 13-14), about 1.5% of an int4 step,
against well under a microsecond to read the row's 0.5 MB. Here the first kernel gives each BLOCK-wide slice of
each row its own program (the slice's largest value and the first index of it), and the second reduces each row's
slices in one program.

The result is torch.argmax's, element for element, whatever the input: the first index of the largest value, with
NaN counted above every number (the first NaN's index) and -inf / +inf compared as numbers. float16 and bfloat16
logits are compared after an exact widening to float32, so ties stay ties. The tests compare the two on ties,
NaNs, infinities, several rows and vocabularies that are not a multiple of BLOCK (tests/runtime/test_triton_argmax.py,
on the CPU through Triton's interpreter).

Triton is imported only here (CUDA, or its interpreter in tests: TRITON_INTERPRET=1 before the import).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 2048  # logits a program of the first kernel reads (4 warps: 16 a thread)


@triton.jit
def _slice_kernel(x_ptr, V, stride, val_ptr, idx_ptr, nan_ptr, P, BLOCK: tl.constexpr):
    """Program (r, p): slice p of row r → its largest non-NaN value, the index it is at first (or that of the
    slice's first NaN), and whether the slice holds a NaN; at [r * P + p]."""
    r = tl.program_id(0)
    p = tl.program_id(1)
    cols = p * BLOCK + tl.arange(0, BLOCK)
    ok = cols < V
    x = tl.load(x_ptr + r.to(tl.int64) * stride + cols, mask=ok, other=float("-inf")).to(tl.float32)
    nan = (x != x) & ok
    has_nan = tl.max(nan.to(tl.int32), 0)
    m = tl.max(tl.where(nan, float("-inf"), x), 0)
    first_nan = tl.min(tl.where(nan, cols, V), 0)
    first_max = tl.min(tl.where(ok & (x == m), cols, V), 0)  # an all -inf slice: its first column
    out = r * P + p
    tl.store(val_ptr + out, m)
    tl.store(idx_ptr + out, tl.where(has_nan > 0, first_nan, first_max))
    tl.store(nan_ptr + out, has_nan)


@triton.jit
def _rows_kernel(val_ptr, idx_ptr, nan_ptr, out_ptr, P, V, PP: tl.constexpr):
    """Program r: row r's P slices → the row's argmax (int64). Slices are in column order, so the smallest index
    among the slices that hold the row's largest value (or a NaN) is the row's first."""
    r = tl.program_id(0)
    pp = tl.arange(0, PP)
    ok = pp < P
    v = tl.load(val_ptr + r * P + pp, mask=ok, other=float("-inf"))
    i = tl.load(idx_ptr + r * P + pp, mask=ok, other=V)
    n = tl.load(nan_ptr + r * P + pp, mask=ok, other=0)
    m = tl.max(v, 0)
    first_max = tl.min(tl.where(ok & (v == m), i, V), 0)
    first_nan = tl.min(tl.where(n > 0, i, V), 0)
    tl.store(out_ptr + r, tl.where(tl.max(n, 0) > 0, first_nan, first_max).to(tl.int64))


@torch.library.custom_op("lorafast::argmax_last", mutates_args=())
def argmax_last(x: torch.Tensor) -> torch.Tensor:
    """x [..., V] (float32, float16 or bfloat16) → x.argmax(-1): int64 [...], the same values."""
    v = x.shape[-1]
    rows = x.reshape(-1, v)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    r = rows.shape[0]
    out = torch.empty(r, dtype=torch.int64, device=x.device)
    if r == 0:
        return out.view(x.shape[:-1])
    p = triton.cdiv(v, BLOCK)
    val = torch.empty(r * p, dtype=torch.float32, device=x.device)
    idx = torch.empty(r * p, dtype=torch.int32, device=x.device)
    nan = torch.empty(r * p, dtype=torch.int32, device=x.device)
    _slice_kernel[(r, p)](rows, v, rows.stride(0), val, idx, nan, p, BLOCK=BLOCK)
    _rows_kernel[(r,)](val, idx, nan, out, p, v, PP=triton.next_power_of_2(p))
    return out.view(x.shape[:-1])


@argmax_last.register_fake
def _(x):
    return x.new_empty(x.shape[:-1], dtype=torch.int64)
