"""int4 x bf16/fp16 products for 1-8 activation rows on the tensor cores: a CUDA kernel compiled at run time.

Why: at 1-8 rows an int4 linear is a pure weight stream (0.5 byte a weight), so it can only be as fast as it
reads. The Triton kernels (runtime/triton_int4.py) stopped at 1.1-2.1 TB/s on the H200, bound by the
instructions that turn nibbles into numbers (bench/TORCH.md, sessions 6-7 and 15). Here a nibble costs under
one instruction: the weights are repacked at load so that one 32-bit word is exactly one thread's share of a
`mma.m16n8k16` A operand (16 weight rows x 16 inputs), and each pair of nibbles becomes a bf16x2 register by a
single `lop3` (nibble | 0x4300 = 128 + code, exact). The tensor core multiplies those by the activations (the
B operand, up to 8 rows; unused columns are zero) into fp32. A second `mma` per tile with a constant A of
-(128 + zero point) removes the offset, so a group's sum is sum((code - zero) * x) in fp32; the group's scale
multiplies it once per row. Products are exact (bf16 x bf16 in fp32), so the result is the dequantized
weight's product up to fp32 summation order: each output column depends on its own activation row only, the
same for any row count (a speculative verify reproduces the single-row call bit for bit).

Layout (`pack_frags`): codes [N, K] → int32 words [N/16][K/CH][32 lanes][CH/16 tiles], CH = min(group, 64)
inputs per chunk. Lane l = 4 g + q of row tile r, chunk c, tile t holds, for kb = c CH + (CH/4) q + 4 t:
bits 0 / 16: W[16r + g][kb], [kb + 1]; bits 4 / 20: W[16r + g + 8][kb], [kb + 1]; bits 8 / 24: W[16r +
g][kb + 2], [kb + 3]; bits 12 / 28: W[16r + g + 8][kb + 2], [kb + 3]. So (w >> 4p) & 0x000F000F is the
mma's A register p, and the lane's activations for a chunk are CH/4 contiguous inputs (one or two 16-byte
loads): the tile's k order is permuted, the same way for A and B. A warp reads its chunk as 512 (CH 64) or
256 contiguous bytes.

Work: a block of KSB warps owns one 16-row tile; warp w sums inputs [w K/KSB, (w + 1) K/KSB) in steps of 256.
Each lane copies its own words for STAGES - 1 steps ahead into a ring in shared memory (`cp.async`; it reads
back only what it copied, so the warp's lanes need no barrier), which keeps 4-12 KB of weights in flight per
warp: session 19's first version, which prefetched one step into registers, read only ~2.3 TB/s. The block's
16 rows of scales (and offset words) are staged in shared memory while the first steps load. The block adds
its warps' partials in shared memory and writes [M, N] in the activations' dtype. Needs K % (256 KSB) == 0, a
group of 32, 64, 128 or 256, and M <= 8 (`fits`). Compiled with NVRTC (torch.cuda._compile_kernel; NVRTC
ships with torch's CUDA wheels) once per variant and process.

Accuracy: the tensor core sums the products in fp32 with the 128 offset still in them, so a group's sum loses
about 4 bits to the offset's cancellation: about 1e-5 of the output row's largest value, far under the one
bf16 / fp16 rounding of the output.
"""

from __future__ import annotations

import functools

import torch

MAX_ROWS = 8  # the mma's N: activation rows per call
STEP = 256  # inputs a warp sums per loop iteration
GROUPS = (32, 64, 128, 256)
KSB_CHOICES = (4, 8, 16)  # warps per block (K slices)
STAGE_CHOICES = (3, 4, 6)  # steps in a warp's ring (STAGES - 1 in flight)
SMEM_LIMIT = 219 * 1024  # dynamic shared memory a block opts into: sm_90's 227 KB less the static 8 KB
_SCALE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

SOURCE = r"""
typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;

#define CH (GS < 64 ? GS : 64)     // inputs per chunk
#define WPL (CH / 16)              // words per lane per chunk (mma tiles of 16 inputs)
#define NCH (256 / CH)             // chunks per step
#define NG (256 / GS)              // groups per step
#define CPG (GS / CH)              // chunks per group
#define RING (STAGES * NCH * 32 * WPL)  // one warp's ring of words in shared memory

#if ADT == 0
#define MAGIC 0x43004300u          // bf16 128.0 in both halves: | nibble = 128 + code
#define MMA "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
#define NEG_OFFSET(z) (0xC300u | (u32)(z))   // bf16 -(128 + z)
#else
#define MAGIC 0x64006400u          // fp16 1024.0: | nibble = 1024 + code
#define MMA "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
#define NEG_OFFSET(z) (0xE400u | (u32)(z))   // fp16 -(1024 + z)
#endif

__device__ __forceinline__ u32 nib2(u32 w) {
    u32 r;
    asm("lop3.b32 %0, %1, %2, %3, 0xea;" : "=r"(r) : "r"(w), "r"(0x000F000Fu), "r"(MAGIC));
    return r;
}

__device__ __forceinline__ void mma(float* c, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm(MMA "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ u32 smem_addr(const void* p) {
    u32 a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}

// One step's words of this lane (NCH chunks) into its slot of the warp's ring, asynchronously: each lane
// copies and later reads back only its own bytes, so no barrier is needed between the warp's lanes.
__device__ __forceinline__ void issue(u32* slot, const u32* wp) {
#pragma unroll
    for (int c = 0; c < NCH; ++c) {
#if WPL == 4
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" :: "r"(smem_addr(slot + c * 32 * WPL)), "l"(wp + c * 32 * WPL) : "memory");
#else
        asm volatile("cp.async.ca.shared.global [%0], [%1], 8;" :: "r"(smem_addr(slot + c * 32 * WPL)), "l"(wp + c * 32 * WPL) : "memory");
#endif
    }
}

__device__ __forceinline__ void ld_x(u32* d, const u16* p) {  // CH / 4 activations = CH / 8 words
    asm("ld.global.nc.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(d[0]), "=r"(d[1]), "=r"(d[2]), "=r"(d[3]) : "l"(p));
#if CH == 64
    asm("ld.global.nc.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(d[4]), "=r"(d[5]), "=r"(d[6]), "=r"(d[7]) : "l"(p + 8));
#endif
}

__device__ __forceinline__ float ld_scale(const void* s, long i) {
#if SDT == 0
    return ((const float*)s)[i];
#else
    u16 h = ((const u16*)s)[i];
    float f;
#if SDT == 1
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
#else
    asm("mov.b32 %0, %1;" : "=f"(f) : "r"(((u32)h) << 16));
#endif
    return f;
#endif
}

extern "C" __global__ void __launch_bounds__(KSB * 32)
int4_mma(const u32* __restrict__ wf, const u16* __restrict__ x, const void* __restrict__ sp,
         const u8* __restrict__ zp, u16* __restrict__ out, int M, int N, int K, int G) {
    extern __shared__ __align__(16) u32 smem[];  // KSB rings, then the block's scales [16][G] (+ offsets)
    __shared__ float red[KSB][4][32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, q = lane & 3;
    const int rt = blockIdx.x;
    const int slice = K / KSB, k0 = warp * slice, steps = slice / 256;
    u32* ring = smem + warp * RING + lane * WPL;
    float* ssm = (float*)(smem + KSB * RING);
    u32* zsm = (u32*)(ssm + 16 * G);
    const u32* wp = wf + ((long)rt * (K / CH) + k0 / CH) * (32 * WPL) + lane * WPL;
    const long wstep = (long)NCH * 32 * WPL;
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < steps) issue(ring + s * (NCH * 32 * WPL), wp + s * wstep);
        asm volatile("cp.async.commit_group;" ::: "memory");
    }
    // the block's 16 rows of scales (and offset words), staged while the first steps' words are in flight
    for (int i = threadIdx.x; i < 16 * G; i += KSB * 32) {
        const int r = i / G, j = i - r * G;
        const long row = rt * 16 + r < N ? rt * 16 + r : N - 1;
        ssm[i] = ld_scale(sp, row * G + j);
#if ASYM
        zsm[i] = NEG_OFFSET(zp[row * G + j]) * 0x00010001u;
#endif
    }
    __syncthreads();
    const bool has_x = g < M;
    const u16* xp = x + (long)(has_x ? g : 0) * K + k0 + (CH / 4) * q;
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    for (int i = 0; i < steps; ++i) {
        if (i + STAGES - 1 < steps) issue(ring + ((i + STAGES - 1) % STAGES) * (NCH * 32 * WPL), wp + (i + STAGES - 1) * wstep);
        asm volatile("cp.async.commit_group;" ::: "memory");
        u32 xr[NCH][CH / 8];
#pragma unroll
        for (int c = 0; c < NCH; ++c) {
            if (has_x) {
                ld_x(xr[c], xp + i * 256 + c * CH);
            } else {
#pragma unroll
                for (int e = 0; e < CH / 8; ++e) xr[c][e] = 0u;
            }
        }
        asm volatile("cp.async.wait_group %0;" :: "n"(STAGES - 1) : "memory");
        const u32* slot = ring + (i % STAGES) * (NCH * 32 * WPL);
        u32 w[NCH][WPL];
#pragma unroll
        for (int c = 0; c < NCH; ++c) {
#if WPL == 4
            asm volatile("ld.shared.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(w[c][0]), "=r"(w[c][1]), "=r"(w[c][2]), "=r"(w[c][3]) : "r"(smem_addr(slot + c * 32 * WPL)));
#else
            asm volatile("ld.shared.v2.u32 {%0,%1}, [%2];" : "=r"(w[c][0]), "=r"(w[c][1]) : "r"(smem_addr(slot + c * 32 * WPL)));
#endif
        }
        const int grp0 = (k0 + i * 256) / GS;
#pragma unroll
        for (int j = 0; j < NG; ++j) {
#if ASYM
            const u32 z0 = zsm[g * G + grp0 + j], z1 = zsm[(g + 8) * G + grp0 + j];
#else
            const u32 z0 = NEG_OFFSET(8) * 0x00010001u, z1 = z0;
#endif
            // three independent accumulator chains (even tiles, odd tiles, the offset), so consecutive mmas
            // do not wait for each other
            float ga[4] = {0.f, 0.f, 0.f, 0.f}, gb[4] = {0.f, 0.f, 0.f, 0.f}, gz[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
            for (int cc = 0; cc < CPG; ++cc) {
                const int c = j * CPG + cc;
#pragma unroll
                for (int t = 0; t < WPL; ++t) {
                    const u32 v = w[c][t];
                    const u32 b0 = xr[c][2 * t], b1 = xr[c][2 * t + 1];
                    mma(t % 2 ? gb : ga, nib2(v), nib2(v >> 4), nib2(v >> 8), nib2(v >> 12), b0, b1);
                    mma(gz, z0, z1, z0, z1, b0, b1);
                }
            }
            const float s0 = ssm[g * G + grp0 + j], s1 = ssm[(g + 8) * G + grp0 + j];
            acc[0] += s0 * ((ga[0] + gb[0]) + gz[0]);
            acc[1] += s0 * ((ga[1] + gb[1]) + gz[1]);
            acc[2] += s1 * ((ga[2] + gb[2]) + gz[2]);
            acc[3] += s1 * ((ga[3] + gb[3]) + gz[3]);
        }
    }
    asm volatile("cp.async.wait_group 0;" ::: "memory");
#pragma unroll
    for (int i = 0; i < 4; ++i) red[warp][i][lane] = acc[i];
    __syncthreads();
    if (threadIdx.x < 128) {
        const int l = threadIdx.x & 31, i = threadIdx.x >> 5;
        float v = 0.f;
#pragma unroll
        for (int w = 0; w < KSB; ++w) v += red[w][i][l];
        const int col = 2 * (l & 3) + (i & 1), row = rt * 16 + (l >> 2) + 8 * (i >> 1);
        if (col < M && row < N) {
            u16 h;
#if ADT == 0
            asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(v));
#else
            asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
#endif
            out[(long)col * N + row] = h;
        }
    }
}
"""


def chunk_cols(group_size: int) -> int:
    return min(group_size, 64)


def smem_bytes(k: int, group_size: int, ksb: int, stages: int, asym: bool) -> int:
    """Dynamic shared memory of one block: the warps' rings and the 16 rows' scales (and offset words)."""
    return ksb * stages * 2048 + 16 * (k // group_size) * 4 * (1 + asym)


def fits(n: int, k: int, group_size: int, rows: int, ksb: int, dtype: torch.dtype, stages: int = 4) -> bool:
    """Whether the kernel takes this call: bf16/fp16 activations, <= 8 rows, a group it supports, K a
    multiple of 256 per warp of the block and the block's shared memory within the limit."""
    return (
        dtype in (torch.bfloat16, torch.float16)
        and 1 <= rows <= MAX_ROWS
        and group_size in GROUPS
        and ksb in KSB_CHOICES
        and stages in STAGE_CHOICES
        and k % (STEP * ksb) == 0
        and n >= 1
        and smem_bytes(k, group_size, ksb, stages, True) <= SMEM_LIMIT
    )


def pack_frags(codes: torch.Tensor, group_size: int) -> torch.Tensor:
    """codes uint8 [N, K] (0..15; K a multiple of the chunk) → int32 words in the mma fragment order (module
    doc), rows padded with zero codes to a multiple of 16 (the kernel never writes them)."""
    ch = chunk_cols(group_size)
    n, k = codes.shape
    if k % ch:
        raise ValueError(f"pack_frags: in_features {k} is not a multiple of {ch}")
    c = torch.nn.functional.pad(codes.to(torch.int32), (0, 0, 0, -n % 16))
    r, t = c.shape[0] // 16, ch // 16
    c = c.view(
        r, 2, 8, k // ch, 4, t, 4
    )  # [r, h, g, chunk, q, t, j]: row 16r + 8h + g, col c ch + 4 t q.. + j
    c = c.permute(0, 3, 2, 4, 5, 1, 6)  # [r, chunk, g, q, t, h, j]
    w = torch.zeros(c.shape[:5], dtype=torch.int32, device=codes.device)
    for h in range(2):
        for j in range(4):
            w |= c[..., h, j] << (16 * (j % 2) + 8 * (j // 2) + 4 * h)  # bit 31 may be set: int32 wraps
    return w.reshape(-1)


def unpack_frags(words: torch.Tensor, n: int, k: int, group_size: int) -> torch.Tensor:
    """The codes [n, k] back from `pack_frags`' words, read the way the mma's fragments define them (PTX ISA,
    m16n8k16 A operand: register p holds row g + 8 (p % 2), inputs 2 q + 8 (p // 2) + {0, 1} of the tile,
    which the kernel's input order maps to chunk offset (CH / 4) q + 4 t + 2 (p // 2) + {0, 1})."""
    ch = chunk_cols(group_size)
    t_n, rows = ch // 16, -(-n // 16) * 16
    w = words.view(rows // 16, k // ch, 8, 4, t_n).to(torch.int64) & 0xFFFFFFFF  # [r, chunk, g, q, t]
    out = torch.empty(rows // 16, 2, 8, k // ch, 4, t_n, 4, dtype=torch.uint8, device=words.device)
    for p in range(4):
        reg = (w >> (4 * p)) & 0x000F000F  # what nib2 turns into the bf16 pair of A register p
        for e in range(2):  # low half: the pair's first input
            out[:, p % 2, :, :, :, :, 2 * (p // 2) + e] = (
                ((reg >> (16 * e)) & 0xF).to(torch.uint8).permute(0, 2, 1, 3, 4)
            )
    return out.view(rows, k)[:n]


@functools.cache
def _kernel(group_size: int, ksb: int, stages: int, asym: bool, scale_code: int, act_fp16: bool):
    defines = (
        f"#define GS {group_size}\n#define KSB {ksb}\n#define STAGES {stages}\n#define ASYM {int(asym)}\n"
    )
    defines += f"#define SDT {scale_code}\n#define ADT {int(act_fp16)}\n"
    kern = torch.cuda._compile_kernel(defines + SOURCE, "int4_mma", nvcc_options=["-std=c++17"])
    kern.set_shared_memory_config(SMEM_LIMIT)  # above 48 KB a block must opt in
    return kern


def available() -> bool:
    """CUDA with NVRTC reachable through torch (the kernel compiles on first use)."""
    return torch.cuda.is_available() and hasattr(torch.cuda, "_compile_kernel")


def mma_mm(
    x: torch.Tensor,
    frags: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    k: int,
    group_size: int,
    ksb: int,
    stages: int = 4,
) -> torch.Tensor:
    """x [M <= 8, k] (bf16/fp16, CUDA) @ dequant(W).T → [M, N] in x's dtype; frags from `pack_frags`, scales
    [N, groups] (fp32/fp16/bf16), zeros uint8 [N, groups] or None (symmetric: 8)."""
    m, n = x.shape[0], scales.shape[0]
    x = x.contiguous()
    if x.data_ptr() % 16:
        x = x.clone()
    out = torch.empty(m, n, device=x.device, dtype=x.dtype)
    asym = zeros is not None
    kern = _kernel(group_size, ksb, stages, asym, _SCALE_CODES[scales.dtype], x.dtype == torch.float16)
    zp = zeros if asym else scales  # never read when symmetric
    kern(
        grid=(-(-n // 16), 1, 1),
        block=(32 * ksb, 1, 1),
        args=[frags, x, scales.contiguous(), zp.contiguous(), out, m, n, k, scales.shape[1]],
        shared_mem=smem_bytes(k, group_size, ksb, stages, asym),
    )
    return out
