"""int4 weight-only matmuls as Triton kernels that read the quantized form's packed nibbles in place.

Weights stay as qform packs them on disk (`qform.pack_nibbles`): uint8 [out, ceil(in/2)], byte j holding
the code of input column 2j in its low nibble and 2j+1 in its high nibble; scales [out, groups] in their
stored dtype; zero points uint8 [out, groups], or none (symmetric: zero 8). w = (code - zero) * scale.

Two kernels, both with split-K (each split writes an fp32 partial, summed after; one split stores the
result directly in the activation dtype):
- GEMV for a few rows (1-8): no tensor cores. Per group it sums x * code, then applies the scale once:
  y = sum_g s_g * (sum_{k in g} x_k q_k - z_g * sum_{k in g} x_k), so the dequantization costs one
  multiply per group, not per weight (the kernel is bound by integer unpacking, not by bandwidth, if
  every weight is scaled).
- GEMM for more rows: the tile of codes is dequantized in registers and fed to tl.dot, split into the
  even and the odd input columns so the nibbles need no interleaving.
Which kernel and which tile sizes run for a (shape, rows) comes from a table measured on the device
(runtime/int4_table.py); `int4_mm` takes that plan and picks the entry for the batch it sees.

Triton is imported only here (CUDA, or its interpreter in tests: TRITON_INTERPRET=1 before the import).
The op is a torch custom op: opaque to inductor, captured in the step's CUDA graph.
"""

import os

import torch
import triton
import triton.language as tl

# One plan entry: (max rows, kind, BN, BK, splits, BM, warps) with kind 0 = GEMV, 1 = GEMM.
ENTRY = 7
GEMV, GEMM = 0, 1
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _jit(fn):
    """triton.jit with ITERS (tiles per split) a runtime value on the GPU, so a new K or split count does
    not compile the kernel again. Triton's interpreter (the CPU tests) cannot loop to a runtime bound under
    numpy 2: there it stays the compile-time constant the source declares. Sizes that only bound masks are
    not specialised (one compile per tile shape); K is, as it sets the row strides (aligned loads)."""
    if _INTERPRET:
        return triton.jit(fn)
    fn.__annotations__.pop("ITERS")
    return triton.jit(fn, do_not_specialize=["M", "N", "G", "k_per_split", "ITERS"])


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
    G,
    k_per_split,  # ITERS * BK
    ITERS: tl.constexpr,  # tiles per split
    MP: tl.constexpr,  # M padded to a power of two
    BN: tl.constexpr,
    BK: tl.constexpr,  # a multiple of GS
    GS: tl.constexpr,
    ASYM: tl.constexpr,
):
    pid_n = tl.program_id(0)
    sp = tl.program_id(1)
    NG: tl.constexpr = BK // GS
    nn = pid_n * BN + tl.arange(0, BN)
    mm = tl.arange(0, MP)
    jj = tl.arange(0, BK // 2)
    gg = tl.arange(0, NG)
    n_ok = nn < N
    m_ok = mm < M
    kb_row = (K + 1) // 2
    k_lo = sp * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)  # the last split's tail past K loads nothing (masked)
    acc = tl.zeros([MP, BN], tl.float32)
    for it in range(0, ITERS):
        k0 = k_lo + it * BK
        kev = k0 + 2 * jj  # even input column of each byte
        ev_ok = kev < k_hi
        od_ok = kev + 1 < k_hi
        w = tl.load(
            w_ptr + nn[:, None] * kb_row + (k0 // 2 + jj)[None, :], mask=n_ok[:, None] & ev_ok[None, :]
        )
        lo = (w & 0xF).to(tl.float32)  # [BN, BK/2]
        hi = (w >> 4).to(tl.float32)
        xrow = x_ptr + mm[:, None] * K + kev[None, :]
        xe = tl.load(xrow, mask=m_ok[:, None] & ev_ok[None, :], other=0.0).to(tl.float32)  # [MP, BK/2]
        xo = tl.load(xrow + 1, mask=m_ok[:, None] & od_ok[None, :], other=0.0).to(tl.float32)
        prod = lo[None, :, :] * xe[:, None, :] + hi[None, :, :] * xo[:, None, :]  # [MP, BN, BK/2]
        dot_g = tl.sum(tl.reshape(prod, [MP, BN, NG, GS // 2]), axis=3)  # [MP, BN, NG]
        x_g = tl.sum(tl.reshape(xe + xo, [MP, NG, GS // 2]), axis=2)  # [MP, NG]
        g = k0 // GS + gg
        g_off = nn[:, None] * G + g[None, :]
        g_ok = n_ok[:, None] & (g < G)[None, :]
        s = tl.load(s_ptr + g_off, mask=g_ok, other=0.0).to(tl.float32)  # [BN, NG]
        if ASYM:
            z = tl.load(z_ptr + g_off, mask=g_ok, other=0).to(tl.float32)
        else:
            z = tl.full([BN, NG], 8.0, tl.float32)
        acc += tl.sum(s[None, :, :] * (dot_g - z[None, :, :] * x_g[:, None, :]), axis=2)
    o_off = (sp * M + mm[:, None]) * N + nn[None, :]
    tl.store(out_ptr + o_off, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


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
    G,
    k_per_split,
    ITERS: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
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
    n_ok = nn < N
    m_ok = mm < M
    kb_row = (K + 1) // 2
    k_lo = sp * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)  # the last split's tail past K loads nothing (masked)
    acc = tl.zeros([BM, BN], tl.float32)
    for it in range(0, ITERS):
        k0 = k_lo + it * BK
        kev = k0 + 2 * jj
        ev_ok = kev < k_hi
        od_ok = kev + 1 < k_hi
        w = tl.load(
            w_ptr + nn[:, None] * kb_row + (k0 // 2 + jj)[None, :], mask=n_ok[:, None] & ev_ok[None, :]
        )
        g_off = nn[:, None] * G + (kev // GS)[None, :]  # a group is even-sized: both nibbles share it
        s = tl.load(s_ptr + g_off, mask=n_ok[:, None] & ev_ok[None, :], other=0.0).to(tl.float32)
        if ASYM:
            z = tl.load(z_ptr + g_off, mask=n_ok[:, None] & ev_ok[None, :], other=0).to(tl.float32)
        else:
            z = 8.0
        xrow = x_ptr + mm[:, None] * K + kev[None, :]
        xe = tl.load(xrow, mask=m_ok[:, None] & ev_ok[None, :], other=0.0)  # [BM, BK/2]
        xo = tl.load(xrow + 1, mask=m_ok[:, None] & od_ok[None, :], other=0.0)
        w_lo = (((w & 0xF).to(tl.float32) - z) * s).to(xe.dtype)  # [BN, BK/2]
        w_hi = (((w >> 4).to(tl.float32) - z) * s).to(xe.dtype)
        if IEEE:
            acc += tl.dot(xe, tl.trans(w_lo), input_precision="ieee")
            acc += tl.dot(xo, tl.trans(w_hi), input_precision="ieee")
        else:
            acc += tl.dot(xe, tl.trans(w_lo))
            acc += tl.dot(xo, tl.trans(w_hi))
    o_off = (sp * M + mm[:, None]) * N + nn[None, :]
    tl.store(out_ptr + o_off, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def _split_len(k: int, bk: int, splits: int) -> int:
    """Input columns per split: a multiple of BK, so splits never cut a tile (nor a group)."""
    return -(-k // (splits * bk)) * bk


def launch(
    x: torch.Tensor,
    w: torch.Tensor,
    s: torch.Tensor,
    z: torch.Tensor | None,
    k: int,
    group_size: int,
    entry: list[int] | tuple[int, ...],
) -> torch.Tensor:
    """x [M, K] @ dequant(w).T with one plan entry (see ENTRY) → [M, N] in x's dtype."""
    _, kind, bn, bk, splits, bm, warps = entry
    bk = max(bk, group_size) if kind == GEMV else bk  # GEMV tiles hold whole groups (powers of two)
    m, n, g = x.shape[0], w.shape[0], s.shape[1]
    kps = _split_len(k, bk, splits)
    splits = -(-k // kps)  # splits that hold columns
    out = (
        torch.empty(m, n, device=x.device, dtype=x.dtype)
        if splits == 1
        else torch.empty(splits, m, n, device=x.device, dtype=torch.float32)
    )
    zp = z if z is not None else s  # never read when symmetric
    if kind == GEMV:
        grid = (triton.cdiv(n, bn), splits)
        mp = triton.next_power_of_2(m)
        _gemv_kernel[grid](
            x,
            w,
            s,
            zp,
            out,
            m,
            n,
            k,
            g,
            kps,
            ITERS=kps // bk,
            MP=mp,
            BN=bn,
            BK=bk,
            GS=group_size,
            ASYM=z is not None,
        )
    else:
        grid = (triton.cdiv(m, bm), triton.cdiv(n, bn), splits)
        _gemm_kernel[grid](
            x, w, s, zp, out, m, n, k, g, kps,
            ITERS=kps // bk, BM=bm, BN=bn, BK=bk, GS=group_size, ASYM=z is not None, IEEE=x.dtype == torch.float32, num_warps=warps,
        )  # fmt: skip
    return out if splits == 1 else out.sum(0).to(x.dtype)


def pick(plan: list[int], rows: int) -> list[int]:
    """The plan entry for `rows`: the first whose max rows covers it, else the last."""
    entries = [plan[i : i + ENTRY] for i in range(0, len(plan), ENTRY)]
    return next((e for e in entries if rows <= e[0]), entries[-1])


@torch.library.custom_op("lorafast::int4_mm", mutates_args=())
def int4_mm(
    x: torch.Tensor,
    w: torch.Tensor,
    s: torch.Tensor,
    z: torch.Tensor | None,
    k: int,
    group_size: int,
    plan: list[int],
) -> torch.Tensor:
    """x [M, k] → [M, N] with the kernel the plan gives for M rows (plan: flattened ENTRY-long entries)."""
    return launch(x.contiguous(), w, s, z, k, group_size, pick(plan, x.shape[0]))


@int4_mm.register_fake
def _(x, w, s, z, k, group_size, plan):
    return x.new_empty(x.shape[0], w.shape[0])
