"""int4 x bf16/fp16 products for 1-8 activation rows on the tensor cores: a CUDA kernel compiled at run time.

Why: at 1-8 rows an int4 linear is a pure weight stream (0.5 byte a weight), so it can only be as fast as it
reads. The Triton kernels (runtime/triton_int4.py) stopped at 1.1-2.1 TB/s on the H200, bound by the
instructions that turn nibbles into numbers (bench/TORCH.md, sessions 6-7 and 15). Here a nibble costs under
one instruction: the weights are repacked at load so that one 32-bit word is exactly one thread's share of a
`mma.m16n8k16` A operand (16 weight rows x 16 inputs), and each pair of nibbles becomes a bf16x2 register by a
single `lop3` (nibble | 0x4300 = 128 + code, exact). The tensor core multiplies those by the activations (the
B operand, up to 8 rows; unused columns are zero) into fp32. A second `mma` per tile with a constant A of
-(128 + zero point) removes the offset, so a group's sum is sum((code - zero) * x) in fp32; the group's scale
multiplies it once per row. Each output column depends on its own activation row only, the same for any row
count (a speculative verify reproduces the single-row call bit for bit).

Layout (`pack_frags`): codes [N, K] → int32 words [N/16][K/CH][32 lanes][CH/16 tiles], CH = min(group, 64)
inputs per chunk. Lane l = 4 g + q of row tile r, chunk c, tile t holds, for kb = c CH + (CH/4) q + 4 t:
bits 0 / 16: W[16r + g][kb], [kb + 1]; bits 4 / 20: W[16r + g + 8][kb], [kb + 1]; bits 8 / 24: W[16r +
g][kb + 2], [kb + 3]; bits 12 / 28: W[16r + g + 8][kb + 2], [kb + 3]. So (w >> 4p) & 0x000F000F is the
mma's A register p, and the lane's activations for a chunk are CH/4 contiguous inputs (one or two 16-byte
loads): the tile's k order is permuted, the same way for A and B. A warp reads its chunk as 512 (CH 64) or
256 contiguous bytes.

Work: a block of KSB warps (1-16) owns RPW 16-row tiles (1-2; a warp's activation loads serve all of them);
warp w sums inputs [w K/KSB, (w + 1) K/KSB) in steps of 256, the next step's words and scales loaded into
registers while the current one multiplies; the block adds its warps' partials in shared memory and writes
[M, N] in the activations' dtype. Which layout runs a shape is the measured table's choice (the plan entry's BN
and BK fields). Needs K % (256 KSB) == 0, a group of 32, 64, 128 or 256, and M <= 8 (`fits`). Compiled with NVRTC
(torch.cuda._compile_kernel; NVRTC ships with torch's CUDA wheels) once per variant and process, when a layer
loads. Session 19 also measured a version that kept 2-5 steps of each warp's words in flight through a `cp.async`
ring in shared memory, with the block's scales staged there: slower (57.2 against 52.7 us for an 8B layer's four
products at 1 row, 375 against 396 tok/s in decode); not kept (bench/TORCH.md).

Measured knobs (session 20, bench/TORCH.md): blocks per SM (MINB, a register cap: 126 registers had held the
8-warp blocks to 2 an SM) and the SUBA variant (the zero point subtracted from A by one fma per register, exact,
in place of the second mma; no offset left in the sums). The plan entry carries them (`layout`).

SUBX (session 22, one activation row only; measured in session 24, bench/TORCH.md): A keeps
the 128 offset (one lop3 a register pair, as the plain variant), and each group's fp32 sum is corrected once by
(128 + zero) x the group's sum of the activation row, which each warp adds for its step (one 16-byte load a lane,
eight adds, a shuffle tree). That drops SUBA's four fma a word (static SASS, sm_90, group 128: 856 instructions
against SUBA's 936 at 4 warps, 808 against 880 at 8; asymmetric 864 / 848 against 976 / 936) at the accuracy of
the plain variant (the offset's cancellation). On the H200 it took the 8B shape's chained layer from 45.4 to
44.2 us; the shipped table selects it at 1 row for qkv, gate_up, down and the fused qkv and gate/up ops.

Fused decode ops (FUSED, `fused_launch`; runtime/triton_fused.py's ops on this kernel, run by paged.fused_parts
for layers whose linears all run it, at one row, where the int4 table's fused_mma section measured a layout):
residual add + RMSNorm + qkv + rope + k/v write, o_proj + residual add, RMSNorm + gate/up + silu-mul. A block
normalizes the activation rows into shared memory (the plain step's roundings: nw * bf16(x * rsqrt(mean(x^2) +
eps))) while its first two steps of weights are in flight; GLU and rope blocks own two 16-row tiles (gate and up,
or a head's two rope halves), each summed by half the warps; the epilogues are triton_fused._epilogue's.

The CPU tests check the packing against the PTX ISA's fragment layouts and emulate the kernel's arithmetic;
the CUDA tests run it (tests/runtime/test_cuda_int4.py).

Accuracy: the tensor core sums the products in fp32 with the 128 offset still in them, so a group's sum loses
about 4 bits to the offset's cancellation: about 1e-5 of the output row's largest value, far under the one
bf16 / fp16 rounding of the output.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools

import torch

MAX_ROWS = 8  # the mma's N: activation rows per call
STEP = 256  # inputs a warp sums per loop iteration
GROUPS = (32, 64, 128, 256)
KSB_CHOICES = (1, 2, 4, 8, 16)  # warps per block (K slices)
RPW_CHOICES = (1, 2)  # 16-row tiles per warp (their activations loaded once)
MINB_CHOICES = (0, 2, 3, 4, 6, 8)  # blocks per SM the compiler must fit (a register cap); 0: its own choice
SUBA = 1  # variant bit: the zero point subtracted from A (one fma per register) rather than by a second mma
PDL = 2  # launch bit: programmatic dependent launch (`_launch`; the same compiled kernel)
# variant bit: A keeps the offset and each group's sum is corrected once by the activation row's group sum (over
# SUBA where both are set); one activation row only (a 1-row plan entry, the 1-row fused ops)
SUBX = 4
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

__device__ __forceinline__ u32 sub_off(u32 a, u32 off) {  // (128 + code) - (128 + z), exact: code - z
    u32 r;
#if ADT == 0
    asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(0x3F803F80u), "r"(off));
#else
    asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(0x3C003C00u), "r"(off));
#endif
    return r;
}

__device__ __forceinline__ void mma(float* c, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm(MMA "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void ld_stream(u32* d, const u32* p) {  // weights: read once, keep L1 for x
#if WPL == 4
    asm("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(d[0]), "=r"(d[1]), "=r"(d[2]), "=r"(d[3]) : "l"(p));
#else
    asm("ld.global.nc.L1::no_allocate.v2.u32 {%0,%1}, [%2];" : "=r"(d[0]), "=r"(d[1]) : "l"(p));
#endif
}

// Programmatic dependent launch (PDL, sm_90+): a kernel launched with it may start while the previous kernel
// in the stream still runs. It loads only weights (never written) before `pdl_wait`, which returns once the
// previous grid has finished and its writes are visible; everything that reads activations or writes memory
// comes after. `pdl_trigger` lets the next kernel launch (its blocks then take SMs as ours retire). Without
// PDL both are no-ops.
__device__ __forceinline__ void pdl_wait() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_trigger() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

__device__ __forceinline__ void ld_x(u32* d, const u16* p) {  // CH / 4 activations = CH / 8 words
    asm("ld.global.nc.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(d[0]), "=r"(d[1]), "=r"(d[2]), "=r"(d[3]) : "l"(p));
#if CH == 64
    asm("ld.global.nc.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(d[4]), "=r"(d[5]), "=r"(d[6]), "=r"(d[7]) : "l"(p + 8));
#endif
}

__device__ __forceinline__ float ld_scale(const void* s, long i) {
#if SDT == 0
    return ((const float*)s)[i];
#else
    u16 h = ((const u16*)s)[i];
#if SDT == 1
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
#else
    float f;
    asm("mov.b32 %0, %1;" : "=f"(f) : "r"(((u32)h) << 16));
    return f;
#endif
#endif
}

__device__ __forceinline__ float to_f(u32 h) {  // an activation-dtype value in the low 16 bits
#if ADT == 0
    return __uint_as_float(h << 16);
#else
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"((u16)h));
    return f;
#endif
}
__device__ __forceinline__ float lo16(u32 v) { return to_f(v & 0xFFFFu); }
__device__ __forceinline__ float hi16(u32 v) { return to_f(v >> 16); }

#if SUBX
// SUBX (one activation row: `mma_mm` and `fused_launch` refuse more): A holds OFF + code (one lop3 a register
// pair, no subtraction), and each group's sum is corrected once by (OFF + zero) * the group's sum of the
// activations, which the warp adds here for the step: lane l sums inputs 8 l .. 8 l + 7, the GS / 8 lanes of a
// group add theirs, and every lane takes each group's sum. Only the accumulators of column 0 (the row) are
// written; the others, corrected alike, are never read.
#define OFF_BASE (ADT == 0 ? 128.f : 1024.f)
template <bool SMEM>
__device__ __forceinline__ void step_sums(const u16* sx, float* sg) {
    const int lane = threadIdx.x & 31;
    u32 t[4];
    const u16* p = sx + 8 * lane;
    if (SMEM) {
        const uint4 v = *(const uint4*)p;
        t[0] = v.x, t[1] = v.y, t[2] = v.z, t[3] = v.w;
    } else {
        asm("ld.global.nc.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(t[0]), "=r"(t[1]), "=r"(t[2]), "=r"(t[3]) : "l"(p));
    }
    float v = ((lo16(t[0]) + hi16(t[0])) + (lo16(t[1]) + hi16(t[1]))) +
              ((lo16(t[2]) + hi16(t[2])) + (lo16(t[3]) + hi16(t[3])));
#pragma unroll
    for (int o = 1; o < GS / 8 && o < 32; o <<= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, o);
#pragma unroll
    for (int j = 0; j < NG; ++j) sg[j] = __shfl_sync(0xFFFFFFFFu, v, (j * (GS / 8)) & 31);
}
#endif

struct Step {  // one step's words and scales for the warp's RPW row tiles
    u32 w[RPW][NCH][WPL];
    float s[RPW][NG][2];
#if ASYM
    u32 z[RPW][NG][2];
#endif
};

__device__ __forceinline__ void load_step(Step& st, const u32* wp, long tile_words, int last, const void* sp,
                                          const u8* zp, const long* srow, int grp) {
#pragma unroll
    for (int r = 0; r < RPW; ++r) {
#pragma unroll
        for (int c = 0; c < NCH; ++c) ld_stream(st.w[r][c], wp + (r <= last ? r : last) * tile_words + c * 32 * WPL);
#pragma unroll
        for (int j = 0; j < NG; ++j) {
            st.s[r][j][0] = ld_scale(sp, srow[2 * r] + grp + j);
            st.s[r][j][1] = ld_scale(sp, srow[2 * r + 1] + grp + j);
#if ASYM
            st.z[r][j][0] = zp[srow[2 * r] + grp + j];
            st.z[r][j][1] = zp[srow[2 * r + 1] + grp + j];
#endif
        }
    }
}

template <bool SMEM>  // SMEM: the activations are in shared memory (the fused kernel's normalized rows)
__device__ __forceinline__ void run_step(const Step& st, const u16* xp, bool has_x, float (*acc)[4],
                                         const u16* sx) {
#if SUBX
    float sg[NG];
    step_sums<SMEM>(sx, sg);
#endif
    u32 xr[NCH][CH / 8];  // loaded once, used by every row tile
#pragma unroll
    for (int c = 0; c < NCH; ++c) {
        if (has_x) {
            if (SMEM) {
#pragma unroll
                for (int v = 0; v < CH / 32; ++v) {
                    const uint4 t = *(const uint4*)(xp + c * CH + 8 * v);
                    xr[c][4 * v] = t.x, xr[c][4 * v + 1] = t.y, xr[c][4 * v + 2] = t.z, xr[c][4 * v + 3] = t.w;
                }
            } else {
                ld_x(xr[c], xp + c * CH);
            }
        } else {
#pragma unroll
            for (int i = 0; i < CH / 8; ++i) xr[c][i] = 0u;
        }
    }
#pragma unroll
    for (int r = 0; r < RPW; ++r) {
#pragma unroll
        for (int j = 0; j < NG; ++j) {
#if !SUBX
#if ASYM
            u32 z0 = NEG_OFFSET(st.z[r][j][0]) * 0x00010001u, z1 = NEG_OFFSET(st.z[r][j][1]) * 0x00010001u;
#else
            u32 z0 = NEG_OFFSET(8) * 0x00010001u, z1 = z0;
#endif
            float gz[4] = {0.f, 0.f, 0.f, 0.f};  // the offset's chain (without SUBA)
#endif
            // independent accumulator chains (even tiles, odd tiles), so consecutive mmas do not wait for each other
            float ga[4] = {0.f, 0.f, 0.f, 0.f}, gb[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
            for (int cc = 0; cc < CPG; ++cc) {
                const int c = j * CPG + cc;
#pragma unroll
                for (int t = 0; t < WPL; ++t) {
                    const u32 w = st.w[r][c][t];
                    const u32 b0 = xr[c][2 * t], b1 = xr[c][2 * t + 1];
#if SUBX  // A = OFF + code; the offset's share is removed once a group, below
                    mma(t % 2 ? gb : ga, nib2(w), nib2(w >> 4), nib2(w >> 8), nib2(w >> 12), b0, b1);
#elif SUBA  // A = code - zero, exact: no offset to remove
                    mma(t % 2 ? gb : ga, sub_off(nib2(w), z0), sub_off(nib2(w >> 4), z1), sub_off(nib2(w >> 8), z0),
                        sub_off(nib2(w >> 12), z1), b0, b1);
#else
                    mma(t % 2 ? gb : ga, nib2(w), nib2(w >> 4), nib2(w >> 8), nib2(w >> 12), b0, b1);
                    mma(gz, z0, z1, z0, z1, b0, b1);
#endif
                }
            }
#if SUBX
#if ASYM
            const float o0 = OFF_BASE + (float)st.z[r][j][0], o1 = OFF_BASE + (float)st.z[r][j][1];
#else
            const float o0 = OFF_BASE + 8.f, o1 = o0;
#endif
            acc[r][0] += st.s[r][j][0] * fmaf(-o0, sg[j], ga[0] + gb[0]);
            acc[r][2] += st.s[r][j][1] * fmaf(-o1, sg[j], ga[2] + gb[2]);
#else
            acc[r][0] += st.s[r][j][0] * ((ga[0] + gb[0]) + gz[0]);
            acc[r][1] += st.s[r][j][0] * ((ga[1] + gb[1]) + gz[1]);
            acc[r][2] += st.s[r][j][1] * ((ga[2] + gb[2]) + gz[2]);
            acc[r][3] += st.s[r][j][1] * ((ga[3] + gb[3]) + gz[3]);
#endif
        }
    }
}

#if MINB
#define BOUNDS __launch_bounds__(KSB * 32, MINB)
#else
#define BOUNDS __launch_bounds__(KSB * 32)
#endif
#if !FUSED
extern "C" __global__ void BOUNDS
int4_mma(const u32* __restrict__ wf, const u16* __restrict__ x, const void* __restrict__ sp,
         const u8* __restrict__ zp, u16* __restrict__ out, int M, int N, int K, int G) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, q = lane & 3;
    const int tiles = (N + 15) / 16, rt0 = blockIdx.x * RPW;
    const int slice = K / KSB, k0 = warp * slice, steps = slice / 256;
    const long tile_words = (long)(K / CH) * 32 * WPL;
    // a block's last row tiles may lie past N: they read the last real tile again and write nothing
#if RPW == 1
    const int last = 0;
#else
    const int last = rt0 + RPW - 1 < tiles ? RPW - 1 : tiles - 1 - rt0;
#endif
    const u32* wp = wf + (long)rt0 * tile_words + (long)(k0 / CH) * (32 * WPL) + lane * WPL;
    long srow[2 * RPW];
#pragma unroll
    for (int r = 0; r < RPW; ++r) {
        const int r0 = (rt0 + (r <= last ? r : last)) * 16 + g;
        srow[2 * r] = (long)(r0 < N ? r0 : N - 1) * G;
        srow[2 * r + 1] = (long)(r0 + 8 < N ? r0 + 8 : N - 1) * G;
    }
    const bool has_x = g < M;
    const u16* xp = x + (long)(has_x ? g : 0) * K + k0 + (CH / 4) * q;
    const long wstep = (long)NCH * 32 * WPL;
    float acc[RPW][4];
#pragma unroll
    for (int r = 0; r < RPW; ++r) acc[r][0] = acc[r][1] = acc[r][2] = acc[r][3] = 0.f;
    Step a, b;
    load_step(a, wp, tile_words, last, sp, zp, srow, k0 / GS);
    pdl_wait();  // x is the previous kernel's output
    pdl_trigger();
    for (int i = 0; i < steps; i += 2) {
        if (i + 1 < steps) load_step(b, wp + (i + 1) * wstep, tile_words, last, sp, zp, srow, (k0 + (i + 1) * 256) / GS);
        run_step<false>(a, xp + i * 256, has_x, acc, x + k0 + i * 256);
        if (i + 1 < steps) {
            if (i + 2 < steps) load_step(a, wp + (i + 2) * wstep, tile_words, last, sp, zp, srow, (k0 + (i + 2) * 256) / GS);
            run_step<false>(b, xp + (i + 1) * 256, has_x, acc, x + k0 + (i + 1) * 256);
        }
    }
    __shared__ float red[KSB][RPW][4][32];
#pragma unroll
    for (int r = 0; r < RPW; ++r) {
#pragma unroll
        for (int i = 0; i < 4; ++i) red[warp][r][i][lane] = acc[r][i];
    }
    __syncthreads();
    for (int o = threadIdx.x; o < 128 * RPW; o += KSB * 32) {  // RPW x 16 rows x 8 columns, from 1-16 warps
        const int l = o & 31, i = (o >> 5) & 3, r = o >> 7;
        float v = 0.f;
#pragma unroll
        for (int w = 0; w < KSB; ++w) v += red[w][r][i][l];
        const int col = 2 * (l & 3) + (i & 1), row = (rt0 + r) * 16 + (l >> 2) + 8 * (i >> 1);
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
#else
// The fused decode kernel (FUSED): the product with its neighbours, as runtime/triton_fused.py's ops.
// NORM: the activations are RMSNorm(x) computed by the block into shared memory first (ADD_IN: x = h + d,
// written to xo by block 0), with the plain step's roundings: nw * bf16(x * rsqrt(mean(x^2) + eps)).
// TWO (GLU or ROPE): a block owns two 16-row tiles, each summed by KSB / 2 warps: GLU the gate tile and its
// up tile (N / 2 rows further), ROPE a tile of a head's first half and the matching tile D / 2 rows further.
// Epilogue (triton_fused._epilogue): BIAS, rope and the k/v write, silu(gate) * up, the residual add (ADD_OUT).
#define TWO (GLU || ROPE)
#define WPT (TWO ? KSB / 2 : KSB)  // warps per tile

#define MAX_M 8

__device__ __forceinline__ u16 rnd(float v) {
    u16 h;
#if ADT == 0
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(v));
#else
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
#endif
    return h;
}
__device__ __forceinline__ float rf(float v) { return to_f(rnd(v)); }  // rounded to the activations' dtype

__device__ __forceinline__ void norm_row(u16* p, uint4 nv, float inv) {  // 8 values: nw * rnd(x * inv), rounded
    uint4 hv = *(const uint4*)p;
    u32* hw = (u32*)&hv;
    const u32* nwv = (const u32*)&nv;
#pragma unroll
    for (int i = 0; i < 4; ++i)
        hw[i] = (u32)rnd(lo16(nwv[i]) * rf(lo16(hw[i]) * inv)) | ((u32)rnd(hi16(nwv[i]) * rf(hi16(hw[i]) * inv)) << 16);
    *(uint4*)p = hv;
}

__device__ __forceinline__ int tile_of(int p, int grp, int N) {
#if ROPE
    return (p / (D / 32)) * (D / 16) + p % (D / 32) + grp * (D / 32);
#elif GLU
    return p + grp * (N / 32);  // N: the gate and up rows
#else
    return p;
#endif
}

extern "C" __global__ void BOUNDS
KNAME(const u32* __restrict__ wf, const u16* __restrict__ x, const u16* __restrict__ d,
               const u16* __restrict__ nw, const void* __restrict__ sp, const u8* __restrict__ zp,
               const u16* __restrict__ bias, const u16* __restrict__ res, u16* __restrict__ out,
               u16* __restrict__ xo, const u16* __restrict__ cosp, const u16* __restrict__ sinp,
               u16* __restrict__ kp, u16* __restrict__ vp, const long long* __restrict__ slots, int pool_stride,
               int M, int N, int K, int G, double eps, int QN, int KN) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, q = lane & 3;
    const int grp = TWO ? warp / WPT : 0, wi = warp % WPT;
    const int tile = tile_of(blockIdx.x, grp, N);
    const int slice = K / WPT, k0 = wi * slice, steps = slice / 256;
    const long tile_words = (long)(K / CH) * 32 * WPL;
    const u32* wp = wf + (long)tile * tile_words + (long)(k0 / CH) * (32 * WPL) + lane * WPL;
    long srow[2];
    {
        const int r0 = tile * 16 + g;
        srow[0] = (long)(r0 < N ? r0 : N - 1) * G;
        srow[1] = (long)(r0 + 8 < N ? r0 + 8 : N - 1) * G;
    }
    const bool has_x = g < M;
    const long wstep = (long)NCH * 32 * WPL;
    Step a, b;
    // the first two steps' weights are in flight while the block normalizes x
    load_step(a, wp, tile_words, 0, sp, zp, srow, k0 / GS);
    if (steps > 1) load_step(b, wp + wstep, tile_words, 0, sp, zp, srow, (k0 + 256) / GS);
    pdl_wait();  // x, d and res are the previous kernels' outputs; out, xo and the pools may be their inputs
    pdl_trigger();
#if NORM
    extern __shared__ __align__(16) u16 xs[];  // [M][K]: the normalized rows, the product's B operand
    __shared__ float ssum[KSB][MAX_M];
    const int e0 = threadIdx.x * 8, estride = KSB * 256;
    uint4 nwr[4];  // the thread's first norm weights, loaded with x (one round trip to L2, not two)
#pragma unroll
    for (int j = 0; j < 4; ++j)
        if (e0 + j * estride < K) nwr[j] = *(const uint4*)(nw + e0 + j * estride);
    for (int m = 0; m < M; ++m) {
        float ss = 0.f;
#pragma unroll 4
        for (int e = e0; e < K; e += estride) {
            uint4 hv = *(const uint4*)(x + (long)m * K + e);
            u32* hw = (u32*)&hv;
#if ADD_IN
            const uint4 dv = *(const uint4*)(d + (long)m * K + e);
            const u32* dw = (const u32*)&dv;
#pragma unroll
            for (int i = 0; i < 4; ++i)
                hw[i] = (u32)rnd(lo16(hw[i]) + lo16(dw[i])) | ((u32)rnd(hi16(hw[i]) + hi16(dw[i])) << 16);
            if (blockIdx.x == 0) *(uint4*)(xo + (long)m * K + e) = hv;
#endif
#pragma unroll
            for (int i = 0; i < 4; ++i) ss += lo16(hw[i]) * lo16(hw[i]) + hi16(hw[i]) * hi16(hw[i]);
            *(uint4*)(xs + m * K + e) = hv;
        }
#pragma unroll
        for (int o = 16; o; o >>= 1) ss += __shfl_xor_sync(0xFFFFFFFFu, ss, o);
        if (lane == 0) ssum[warp][m] = ss;
    }
    __syncthreads();
    for (int m = 0; m < M; ++m) {
        float ss = 0.f;
        for (int w = 0; w < KSB; ++w) ss += ssum[w][m];
        const float inv = rsqrtf(ss / (float)K + (float)eps);
#pragma unroll
        for (int j = 0; j < 4; ++j)
            if (e0 + j * estride < K) norm_row(xs + m * K + e0 + j * estride, nwr[j], inv);
        for (int e = e0 + 4 * estride; e < K; e += estride) norm_row(xs + m * K + e, *(const uint4*)(nw + e), inv);
    }
    __syncthreads();
    const u16* xp = xs + (has_x ? g : 0) * K + k0 + (CH / 4) * q;
    const u16* sx0 = xs + k0;
#define SM true
#else
    const u16* xp = x + (long)(has_x ? g : 0) * K + k0 + (CH / 4) * q;
    const u16* sx0 = x + k0;
#define SM false
#endif
    float acc[1][4] = {{0.f, 0.f, 0.f, 0.f}};
    for (int i = 0; i < steps; i += 2) {  // step i + 1 is in flight while step i multiplies
        run_step<SM>(a, xp + i * 256, has_x, acc, sx0 + i * 256);
        if (i + 2 < steps) load_step(a, wp + (i + 2) * wstep, tile_words, 0, sp, zp, srow, (k0 + (i + 2) * 256) / GS);
        if (i + 1 < steps) {
            run_step<SM>(b, xp + (i + 1) * 256, has_x, acc, sx0 + (i + 1) * 256);
            if (i + 3 < steps) load_step(b, wp + (i + 3) * wstep, tile_words, 0, sp, zp, srow, (k0 + (i + 3) * 256) / GS);
        }
    }
    __shared__ float red[KSB][4][32];
#pragma unroll
    for (int i = 0; i < 4; ++i) red[warp][i][lane] = acc[0][i];
    __syncthreads();
    const int t0 = tile_of(blockIdx.x, 0, N);
    for (int o = threadIdx.x; o < 128; o += KSB * 32) {  // 16 rows x 8 columns of each of the block's tiles
        const int l = o & 31, i = o >> 5;
        float y = 0.f, y2 = 0.f;
#pragma unroll
        for (int w = 0; w < WPT; ++w) y += red[w][i][l];
#if TWO
#pragma unroll
        for (int w = 0; w < WPT; ++w) y2 += red[WPT + w][i][l];
#endif
        const int m = 2 * (l & 3) + (i & 1), n = t0 * 16 + (l >> 2) + 8 * (i >> 1);
        if (m >= M) continue;
#if ROPE
        const int n2 = n + D / 2;
#if BIAS
        y += to_f(bias[n]);
        y2 += to_f(bias[n2]);
#endif
        const float lo = rf(y), hi = rf(y2);
        const int c = n % D;
        const float c1 = to_f(cosp[m * D + c]), s1 = to_f(sinp[m * D + c]);
        const float c2 = to_f(cosp[m * D + c + D / 2]), s2 = to_f(sinp[m * D + c + D / 2]);
        const bool is_v = n >= QN + KN;
        const u16 o1 = rnd(is_v ? lo : lo * c1 - hi * s1), o2 = rnd(is_v ? hi : hi * c2 + lo * s2);
        if (n < QN) {
            out[(long)m * QN + n] = o1;
            out[(long)m * QN + n2] = o2;
        } else {
            const long slot = (long)slots[m];
            const int kc = is_v ? n - QN - KN : n - QN;
            const long at = (long)(kc / D) * pool_stride + slot * D + kc % D;
            u16* pool = is_v ? vp : kp;
            pool[at] = o1;
            pool[at + D / 2] = o2;
        }
#elif GLU
        const float gt = rf(y), up = rf(y2);
        out[(long)m * (N / 2) + n] = rnd(gt / (1.f + __expf(-gt)) * up);
#else
        if (n >= N) continue;
#if BIAS
        y += to_f(bias[n]);
#endif
#if ADD_OUT
        y = rf(y) + to_f(res[(long)m * N + n]);
#endif
        out[(long)m * N + n] = rnd(y);
#endif
    }
}
#endif
"""


def chunk_cols(group_size: int) -> int:
    return min(group_size, 64)


def fits(
    n: int, k: int, group_size: int, rows: int, ksb: int, dtype: torch.dtype, rpw: int = 1, minb: int = 0
) -> bool:
    """Whether the kernel takes this call: bf16/fp16 activations, <= 8 rows, a group it supports, K a
    multiple of 256 per warp of the block, and at most 2,048 threads an SM for the blocks asked for."""
    return (
        dtype in (torch.bfloat16, torch.float16)
        and 1 <= rows <= MAX_ROWS
        and group_size in GROUPS
        and ksb in KSB_CHOICES
        and rpw in RPW_CHOICES
        and minb in MINB_CHOICES
        and 32 * ksb * minb <= 2048
        and k % (STEP * ksb) == 0
        and n >= 1
    )


def layout(entry) -> tuple[int, int, int, int]:
    """A plan entry's kernel layout (int4_table's MMA entry [rows, MMA, KSB, RPW, 1, MINB, variant bits]):
    (warps per block, row tiles per warp, blocks per SM asked of the compiler, variant bits)."""
    return entry[2], max(1, entry[3]), entry[5], entry[6]


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """t contiguous, from a 16-byte aligned address (the kernels load activations 16 bytes at a time)."""
    t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


def pack_frags(codes: torch.Tensor, group_size: int) -> torch.Tensor:
    """codes uint8 [N, K] (0..15; K a multiple of the chunk) → int32 words in the mma fragment order (module
    doc), rows padded with zero codes to a multiple of 16 (the kernel never writes them)."""
    ch = chunk_cols(group_size)
    n, k = codes.shape
    if k % ch:
        raise ValueError(f"pack_frags: in_features {k} is not a multiple of {ch}")
    c = torch.nn.functional.pad(codes.to(torch.int32), (0, 0, 0, -n % 16))
    r, t = c.shape[0] // 16, ch // 16
    # [r, h, g, chunk, q, t, j]: row 16 r + 8 h + g, input chunk ch + (ch / 4) q + 4 t + j
    c = c.view(r, 2, 8, k // ch, 4, t, 4)
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


def _defines(group_size, ksb, rpw, asym, scale_code, act_fp16, minb, bits, fused: bool) -> str:
    """The source's compile-time switches shared by the plain kernel and the fused ops."""
    return (
        f"#define GS {group_size}\n#define KSB {ksb}\n#define RPW {rpw}\n#define ASYM {int(asym)}\n"
        f"#define SDT {scale_code}\n#define ADT {int(act_fp16)}\n#define MINB {minb}\n"
        f"#define SUBA {int(bool(bits & SUBA))}\n#define SUBX {int(bool(bits & SUBX))}\n#define FUSED {int(fused)}\n"
    )


def _kernel(*variant: int, device: int | None = None):
    """The plain kernel's variant (group size, warps, row tiles, asym, scale code, fp16 activations, blocks per
    SM, bits: `_compiled`'s arguments) for a CUDA device (its index; None: the current one), compiled once a
    process and device: a compiled module is loaded into one device's context. PDL is a launch bit, not a
    variant."""
    *layout_, bits = variant
    idx = torch.cuda.current_device() if device is None else device
    return _compiled(*layout_, bits & ~PDL, idx)


@functools.cache
def _compiled(
    group_size: int,
    ksb: int,
    rpw: int,
    asym: bool,
    scale_code: int,
    act_fp16: bool,
    minb: int,
    bits: int,
    device: int,
):
    defines = _defines(group_size, ksb, rpw, asym, scale_code, act_fp16, minb, bits, False)
    with torch.cuda.device(device):
        return torch.cuda._compile_kernel(defines + SOURCE, "int4_mma", nvcc_options=["-std=c++17"])


def _one_row_subx(bits: int, rows: int) -> None:
    """SUBX sums one activation row's groups (the kernel source's `step_sums`): a call of more rows is refused."""
    if bits & SUBX and rows != 1:
        raise ValueError(f"int4 MMA kernel: the SUBX variant takes one activation row, not {rows}")


def _on(device: torch.device | None):
    """A context in which `device` is the current CUDA device (what the launches' streams and the compiled
    modules' contexts follow): nothing to do when it already is, or for None."""
    if (
        device is None
        or device.type != "cuda"
        or device.index is None
        or device.index == torch.cuda.current_device()
    ):
        return contextlib.nullcontext()
    return torch.cuda.device(device)


def available() -> bool:
    """CUDA with NVRTC reachable through torch (`unready` then compiles a variant, at a layer's load)."""
    return torch.cuda.is_available() and hasattr(torch.cuda, "_compile_kernel")


def unready(
    group_size: int,
    ksb: int,
    rpw: int,
    asym: bool,
    scale_dtype: torch.dtype,
    act_dtype: torch.dtype,
    minb: int = 0,
    bits: int = 0,
    device: int | None = None,
) -> str | None:
    """None when this variant of the kernel compiles here, for CUDA device `device` (None: the current one; it
    is then cached for the process and device), else why not: a layer then runs another kernel rather than
    failing in its first decode step."""
    if not available():
        return "this torch has no torch.cuda._compile_kernel (NVRTC) or no CUDA device"
    try:
        _kernel(
            group_size, ksb, rpw, asym, _SCALE_CODES[scale_dtype], act_dtype == torch.float16, minb, bits,
            device=device,
        )  # fmt: skip
    except Exception as e:  # noqa: BLE001 - any compile or load failure means: use another kernel
        return f"{type(e).__name__}: {str(e)[:300]}"
    return None


def mma_mm(
    x: torch.Tensor,
    frags: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    k: int,
    group_size: int,
    ksb: int,
    rpw: int = 1,
    minb: int = 0,
    bits: int = 0,
) -> torch.Tensor:
    """x [M <= 8, k] (bf16/fp16, CUDA) @ dequant(W).T → [M, N] in x's dtype; frags from `pack_frags`, scales
    [N, groups] (fp32/fp16/bf16), zeros uint8 [N, groups] or None (symmetric: 8); ksb warps per block, each
    over rpw row tiles; minb blocks per SM asked of the compiler; bits: variant bits (SUBA). A call outside
    `fits` raises (a K past the last whole step would otherwise be summed as nothing)."""
    m, n = x.shape[0], scales.shape[0]
    _one_row_subx(bits, m)
    if not fits(n, k, group_size, m, ksb, x.dtype, rpw, minb) or x.shape[1] != k or x.device.type != "cuda":
        raise ValueError(
            f"int4 MMA kernel: {m} rows of {x.dtype} on {x.device}, K {x.shape[1]} (k={k}), group {group_size},"
            f" {ksb} warps of {rpw} row tiles, {minb} blocks an SM: it takes 1-{MAX_ROWS} bf16/fp16 rows on CUDA,"
            f" groups {GROUPS}, K a multiple of {STEP} x {ksb} warps, {RPW_CHOICES} tiles and {MINB_CHOICES}"
            " blocks (2,048 threads an SM)"
        )
    x = _aligned(x)
    out = torch.empty(m, n, device=x.device, dtype=x.dtype)
    zp = zeros if zeros is not None else scales  # never read when symmetric
    kern = _kernel(
        group_size, ksb, rpw, zeros is not None, _SCALE_CODES[scales.dtype], x.dtype == torch.float16, minb, bits,
        device=x.device.index,
    )  # fmt: skip
    _launch(kern, (-(-n // (16 * rpw)), 1, 1), (32 * ksb, 1, 1), _plain_args(frags, x, scales, zp, out, n, k),
            pdl=bool(bits & PDL), device=x.device)  # fmt: skip
    return out


class _LaunchAttr(ctypes.Structure):  # the driver's CUlaunchAttribute: id, padding, a 64-byte value union
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_int * 16)]


class _LaunchConfig(ctypes.Structure):  # CUlaunchConfig
    _fields_ = [
        ("grid", ctypes.c_uint * 3),
        ("block", ctypes.c_uint * 3),
        ("shared_mem", ctypes.c_uint),
        ("stream", ctypes.c_void_p),
        ("attrs", ctypes.POINTER(_LaunchAttr)),
        ("n_attrs", ctypes.c_uint),
    ]


_PROGRAMMATIC_STREAM_SERIALIZATION = 6  # CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION


def pdl_available(device) -> bool:
    """Whether `_launch` can make programmatic dependent launches on this device: an sm90+ GPU and a driver
    with cuLaunchKernelEx (CUDA 12+)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    if torch.cuda.get_device_capability(device) < (9, 0):
        return False
    from torch.cuda._utils import _get_gpu_runtime_library

    try:
        return _get_gpu_runtime_library().cuLaunchKernelEx is not None
    except (AttributeError, OSError):
        return False


def _launch(
    kern, grid, block, args: list, shared_mem: int = 0, pdl: bool = False, device: torch.device | None = None
) -> None:
    """kern(grid, block, args) on the current stream of `device` (its tensors' device, made current for the
    launch: `_on`); pdl: as a programmatic dependent launch (cuLaunchKernelEx with programmatic stream
    serialization: the kernel may start before the previous one in the stream ends, and waits for it in
    `pdl_wait`; captured into CUDA graphs as a programmatic edge). The arguments are converted as torch's
    launcher converts them (a tensor: its pointer; an int: a C int; a float: a double)."""
    with _on(device):
        if not pdl:
            kern(grid=grid, block=block, args=args, shared_mem=shared_mem)
            return
        if shared_mem >= 48 * 1024 and shared_mem > kern._max_shared_mem_bytes:
            raise RuntimeError(
                f"int4 MMA kernel: {shared_mem} bytes of shared memory, not configured at load"
            )
        held = []
        for a in args:
            if isinstance(a, torch.Tensor):
                held.append(ctypes.c_void_p(a.data_ptr()))
            elif isinstance(a, int):
                held.append(ctypes.c_int(a))
            elif isinstance(a, float):
                held.append(ctypes.c_double(a))
            else:
                raise TypeError(f"int4 MMA kernel argument of type {type(a).__name__}")
        params = (ctypes.c_void_p * len(held))(*[ctypes.cast(ctypes.byref(h), ctypes.c_void_p) for h in held])
        attr = _LaunchAttr(id=_PROGRAMMATIC_STREAM_SERIALIZATION)
        attr.value[0] = 1
        cfg = _LaunchConfig(
            (ctypes.c_uint * 3)(*grid),
            (ctypes.c_uint * 3)(*block),
            shared_mem,
            torch.cuda.current_stream()._as_parameter_,
            ctypes.pointer(attr),
            1,
        )
        from torch.cuda._utils import _get_gpu_runtime_library

        rc = _get_gpu_runtime_library().cuLaunchKernelEx(ctypes.byref(cfg), kern.func, params, None)
        if rc != 0:
            raise RuntimeError(
                f"int4 MMA kernel: cuLaunchKernelEx with programmatic dependent launch failed ({rc})"
            )


def _plain_args(frags, x, scales, zp, out, n: int, k: int) -> list:
    """The plain kernel's arguments, in its CUDA signature's order."""
    return [frags, x, scales.contiguous(), zp.contiguous(), out, x.shape[0], n, k, scales.shape[1]]


# The fused decode ops (runtime/triton_fused.py's, on this kernel): the first three products of a decoder layer
# with their neighbours. The fourth (down_proj) is the plain kernel.
QKV_OP, O_OP, GLU_OP = "add_norm_qkv_rope", "gemv_add", "norm_glu"
_FLAGS = {  # ADD_IN, NORM, GLU, ROPE, ADD_OUT
    QKV_OP: (1, 1, 0, 1, 0),
    O_OP: (0, 0, 0, 0, 1),
    GLU_OP: (0, 1, 1, 0, 0),
}


def fused_fits(op: str, n: int, k: int, group_size: int, ksb: int, minb: int, head_dim: int = 0) -> bool:
    """Whether the fused op takes this weight [n, k]: the plain kernel's rules with each tile's warps, and for
    the GLU op whole 16-row tiles of gate and of up rows, for the QKV op heads of a multiple of 32 rows."""
    two = op in (QKV_OP, GLU_OP)
    wpt = ksb // 2 if two else ksb
    return (
        op in _FLAGS
        and group_size in GROUPS
        and ksb in KSB_CHOICES
        and (not two or ksb >= 2)
        and minb in MINB_CHOICES
        and 32 * ksb * minb <= 2048
        and k % (STEP * wpt) == 0
        and (op != GLU_OP or n % 32 == 0)
        and (op != QKV_OP or (head_dim % 32 == 0 and n % head_dim == 0))
    )


@functools.cache
def _fused(op: str, group_size: int, ksb: int, asym: bool, scale_code: int, act_fp16: bool, minb: int,
           bits: int, bias: bool, head_dim: int, device: int):  # fmt: skip
    """A fused op's variant, compiled once a process and device (as `_compiled`)."""
    add_in, norm, glu, rope, add_out = _FLAGS[op]
    defines = _defines(group_size, ksb, 1, asym, scale_code, act_fp16, minb, bits, True)
    defines += f"#define ADD_IN {add_in}\n#define NORM {norm}\n#define GLU {glu}\n#define ROPE {rope}\n"
    defines += f"#define BIAS {int(bias)}\n#define ADD_OUT {add_out}\n"
    defines += f"#define D {head_dim or 32}\n#define KNAME int4_mma_{op}\n"  # a name per op, for profiles
    with torch.cuda.device(device):
        return torch.cuda._compile_kernel(defines + SOURCE, f"int4_mma_{op}", nvcc_options=["-std=c++17"])


def _fused_key(op, group_size, zeros, scales, lay, act_dtype, bias: bool, head_dim: int) -> tuple:
    """`_fused`'s arguments: the variant compiled at load (fused_unready) is the one launched (fused_launch), for
    the device of the layer's tensors."""
    ksb, minb, bits = lay
    asym, scale_code = zeros is not None, _SCALE_CODES[scales.dtype]
    idx = scales.device.index if scales.device.type == "cuda" else -1  # -1: not a CUDA tensor (a CPU test's)
    return (
        op,
        group_size,
        ksb,
        asym,
        scale_code,
        act_dtype == torch.float16,
        minb,
        bits & ~PDL,
        bias,
        head_dim,
        idx,
    )


def fused_unready(
    op: str, m, lay, act_dtype: torch.dtype, bias: bool = False, head_dim: int = 0
) -> str | None:
    """None when the fused op's variant for int4 linear m (an `Int4TritonLinear` with `weight_frags`) compiles
    here, with shared memory for 8 normalized rows of its K; else why not."""
    if not available():
        return "this torch has no torch.cuda._compile_kernel (NVRTC) or no CUDA device"
    if not fused_fits(op, m.out_features, m.in_features, m.group_size, lay[0], lay[1], head_dim):
        return (
            f"{op}: weight {m.out_features}x{m.in_features}, group {m.group_size}, layout {lay}: does not fit"
        )
    try:
        kern = _fused(*_fused_key(op, m.group_size, m.zeros, m.scales, lay, act_dtype, bias, head_dim))
        if _FLAGS[op][1]:
            kern.set_shared_memory_config(max(kern._max_shared_mem_bytes, MAX_ROWS * m.in_features * 2))
    except Exception as e:  # noqa: BLE001 - any compile or load failure means: use the unfused kernels
        return f"{type(e).__name__}: {str(e)[:300]}"
    return None


def fused_launch(op, x, frags, scales, zeros, k, group_size, lay, *, delta=None, nw=None, eps=0.0, bias=None,
                 res=None, rope=None):  # fmt: skip
    """One fused op on rows x [M <= 8, k] (bf16/fp16, CUDA): QKV_OP → (x = x + delta, q = rope(RMSNorm(x) @ W^T
    + bias)'s q heads) with its k and v heads written into the pools (rope = (cos [M, D], sin, k_pool [HKV, slots,
    D], v_pool, slots [M] int64, q_cols)); O_OP → res + x @ W^T; GLU_OP → silu(gate) * up of RMSNorm(x) @ W^T
    ([M, N / 2])."""
    m_rows, n = x.shape[0], scales.shape[0]
    ksb = lay[0]
    _one_row_subx(lay[2], m_rows)
    add_in, norm, glu, use_rope, _ = _FLAGS[op]
    x = _aligned(x)
    hd = rope[2].shape[2] if use_rope else 0
    kern = _fused(*_fused_key(op, group_size, zeros, scales, lay, x.dtype, bias is not None, hd))
    d = _aligned(delta) if add_in else x
    w = _aligned(nw) if norm else x
    xo = torch.empty_like(x) if add_in else x
    if use_rope:
        cos, sin, kp, vp, slots, qn = rope
        kn = (n - qn) // 2
        if qn % hd or kn % hd or kp.shape[0] * hd != kn or kp.stride(1) != hd or kp.stride(2) != 1:
            raise ValueError(
                f"int4 MMA qkv + rope: {n} rows, {qn} of q, head dim {hd}, k pool {tuple(kp.shape)}"
            )
        out = torch.empty(m_rows, qn, device=x.device, dtype=x.dtype)
        cos, sin = cos.to(x.dtype).contiguous(), sin.to(x.dtype).contiguous()
        grid, tail = n // 32, (cos, sin, kp, vp, slots.to(torch.int64).contiguous(), kp.stride(0))
    else:
        qn = kn = 0
        out = torch.empty(m_rows, n // 2 if glu else n, device=x.device, dtype=x.dtype)
        grid, tail = (n // 32 if glu else -(-n // 16)), (x, x, x, x, x, 0)
    zp = zeros if zeros is not None else scales
    args = [frags, x, d, w, scales.contiguous(), zp.contiguous(), x if bias is None else bias.to(x.dtype)]
    args += [
        res.contiguous() if res is not None else x,
        out,
        xo,
        *tail,
        m_rows,
        n,
        k,
        scales.shape[1],
        float(eps),
    ]
    _launch(
        kern,
        (grid, 1, 1),
        (32 * ksb, 1, 1),
        [*args, qn, kn],
        pdl=bool(lay[2] & PDL),
        shared_mem=m_rows * k * 2 if norm else 0,
        device=x.device,
    )
    return (xo, out) if add_in else out


@torch.library.custom_op("lorafast::mma_add_norm_qkv_rope", mutates_args=("k_pool", "v_pool"))
def mma_add_norm_qkv_rope(
    h: torch.Tensor,
    delta: torch.Tensor,
    nw: torch.Tensor,
    frags: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    k: int,
    group_size: int,
    lay: list[int],
    eps: float,
    bias: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    slots: torch.Tensor,
    q_cols: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """triton_fused.add_norm_qkv_rope on an int4 qkv_proj: (x = h + delta [M, K], q [M, q_cols])."""
    rope = (cos, sin, k_pool, v_pool, slots, q_cols)
    return fused_launch(
        QKV_OP,
        h,
        frags,
        scales,
        zeros,
        k,
        group_size,
        tuple(lay),
        delta=delta,
        nw=nw,
        eps=eps,
        bias=bias,
        rope=rope,
    )


@mma_add_norm_qkv_rope.register_fake
def _(
    h, delta, nw, frags, scales, zeros, k, group_size, lay, eps, bias, cos, sin, k_pool, v_pool, slots, q_cols
):
    return torch.empty_like(h), h.new_empty(h.shape[0], q_cols)


@torch.library.custom_op("lorafast::mma_gemv_add", mutates_args=())
def mma_gemv_add(
    a: torch.Tensor,
    frags: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    k: int,
    group_size: int,
    lay: list[int],
    r: torch.Tensor,
) -> torch.Tensor:
    """triton_fused.gemv_add on an int4 o_proj: r + a @ W^T [M, N]."""
    return fused_launch(O_OP, a, frags, scales, zeros, k, group_size, tuple(lay), res=r)


@mma_gemv_add.register_fake
def _(a, frags, scales, zeros, k, group_size, lay, r):
    return torch.empty_like(r)


@torch.library.custom_op("lorafast::mma_norm_glu", mutates_args=())
def mma_norm_glu(
    x: torch.Tensor,
    nw: torch.Tensor,
    frags: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    k: int,
    group_size: int,
    lay: list[int],
    eps: float,
) -> torch.Tensor:
    """triton_fused.norm_glu on an int4 gate_up_proj: silu(gate) * up of RMSNorm(x) @ W^T [M, N / 2]."""
    return fused_launch(GLU_OP, x, frags, scales, zeros, k, group_size, tuple(lay), nw=nw, eps=eps)


@mma_norm_glu.register_fake
def _(x, nw, frags, scales, zeros, k, group_size, lay, eps):
    return x.new_empty(x.shape[0], scales.shape[0] // 2)
