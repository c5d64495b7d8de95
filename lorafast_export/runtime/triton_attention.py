"""Paged decode attention as a Triton kernel that reads the KV pool in place (split-K over the context).

`decode_gather` (runtime/attention.py) copies every row's blocks into a dense tensor first; at batch 32
that copy was 1.9 of 9.4 ms per Llama-3-8B decode step on an H200 (bench/TORCH.md). Here each program
owns (row, kv head, context split): it walks its share of the row's block table, loads `blocks` 16-token
blocks of K and V at a time straight from the pool, and keeps an online softmax for the query heads that share
the kv head. Splits over the context keep the GPU busy at small batches; their partial outputs merge by
log-sum-exp weights in a second small kernel, or (with `counters`, option attn_last_merges) in the same kernel,
by the last of a (row, kv head)'s split programs to finish; with one split the kernel writes the output itself.
attention.decode_plan picks splits and blocks.

Triton is imported only here (CUDA, or its interpreter in tests: TRITON_INTERPRET=1 before the import).
The op is a torch custom op, so torch.compile treats it as one opaque kernel and CUDA graphs capture it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from lorafast_export.runtime.attention import decode_plan
from lorafast_export.runtime.triton_int4 import _INTERPRET


@triton.jit
def pdl_start(PDL: tl.constexpr, EARLY: tl.constexpr):
    """A programmatic dependent launch's start (these kernels' and runtime/triton_fused.py's): wait for the kernel
    before (griddepcontrol.wait), then let the next kernel launch; EARLY lets it launch first, so that the kernel
    after the attention loads its weights while the attention waits and runs (its own wait still comes before it
    reads anything the attention writes)."""
    if PDL:
        if EARLY:
            gdc_launch_dependents()
        gdc_wait()
        if not EARLY:
            gdc_launch_dependents()


@triton.jit
def _blocks(k_ptr, v_ptr, tables_ptr, b, m_width, j0, hi, n, first, base, q, m_i, l_i, acc, scale,
            D: tl.constexpr, BS: tl.constexpr, NB: tl.constexpr, IEEE: tl.constexpr):  # fmt: skip
    """Table entries j0 .. j0 + NB - 1 (those below hi) of row b folded into the online softmax (m_i, l_i, acc)."""
    tt = tl.arange(0, NB * BS)
    dd = tl.arange(0, D)
    j = j0 + tt // BS
    live = j < hi
    phys = tl.load(tables_ptr + b * m_width + j, mask=live, other=0).to(tl.int64)
    tok = j * BS + tt % BS
    ok = live & (tok < n) & (tok >= first)
    off = base + (phys * BS + tt % BS)[:, None] * D + dd[None, :]
    k = tl.load(k_ptr + off, mask=ok[:, None], other=0.0)
    v = tl.load(v_ptr + off, mask=ok[:, None], other=0.0)
    if IEEE:  # fp32 pools: exact fp32 dots (the default would round the inputs to tf32)
        sc = tl.dot(q, tl.trans(k), input_precision="ieee") * scale  # [GP, NB * BS]
    else:
        sc = tl.dot(q, tl.trans(k)).to(tl.float32) * scale
    sc = tl.where(ok[None, :], sc, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(sc, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp(sc - m_safe[:, None])
    alpha = tl.exp(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    if IEEE:
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v).to(tl.float32)
    m_i = m_new
    return m_i, l_i, acc


@triton.jit
def _paged_decode_kernel(
    q_ptr,  # [B, HQ, D]
    k_ptr,  # [HKV, SLOTS, D]
    v_ptr,
    tables_ptr,  # [B, M] int32
    lens_ptr,  # [B] int64: tokens of each row, the new one included
    o_ptr,  # [B, HQ, SPLITS, D] fp32
    lse_ptr,  # [B, HQ, SPLITS] fp32
    cnt_ptr,  # [>= B * HKV] int32, all 0 (LAST): programs of each (row, kv head) done; left at 0
    out_ptr,  # [B, HQ, D] in q's dtype (LAST)
    slots,
    m_width,
    window,  # attend to the last `window` tokens; <= 0: all
    scale,
    HQ: tl.constexpr,
    G: tl.constexpr,  # query heads per kv head
    GP: tl.constexpr,  # G padded for tl.dot (>= 16)
    D: tl.constexpr,
    BS: tl.constexpr,  # cache block size
    SPLITS: tl.constexpr,
    PER,  # table entries per split
    NB: tl.constexpr,  # table entries (cache blocks) an iteration: NB x BS keys per dot
    IEEE: tl.constexpr,
    PDL: tl.constexpr,  # launched as a programmatic dependent launch (`paged_decode`)
    EARLY: tl.constexpr,  # PDL: let the next kernel launch before this one's wait (`paged_decode`'s early)
    LAST: tl.constexpr,  # the last program of each (row, kv head) to finish merges its splits (no merge kernel)
    SP: tl.constexpr,  # SPLITS padded to a power of two (LAST)
    ONE: tl.constexpr,  # SPLITS == 1 and not LAST: the output written here, in q's dtype (no merge kernel)
    LOOP: tl.constexpr,  # compiled (not the interpreter): the blocks' loop as a for loop
):
    pdl_start(PDL, EARLY)  # nothing read or written before the previous kernel is done
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.program_id(2)
    n = tl.load(lens_ptr + b).to(tl.int32)
    first = tl.where(window > 0, tl.maximum(n - window, 0), 0)
    rows = tl.arange(0, GP)
    dd = tl.arange(0, D)
    qh = h * G + rows
    q = tl.load(q_ptr + (b * HQ + qh)[:, None] * D + dd[None, :], mask=(rows < G)[:, None], other=0.0)
    m_i = tl.full([GP], float("-inf"), tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, D], tl.float32)
    base = h.to(tl.int64) * slots * D
    # this split's table entries that hold a token of the row's window: the rest would add nothing (a block of
    # masked tokens leaves m, l and acc as they are, bit for bit), so the loop skips them
    lo = tl.maximum(s * PER, first // BS)
    hi = tl.minimum(s * PER + PER, tl.cdiv(n, BS))
    if LOOP:  # compiled: a for loop over the row's own bounds, which Triton software-pipelines
        for j0 in range(lo, hi, NB):
            m_i, l_i, acc = _blocks(k_ptr, v_ptr, tables_ptr, b, m_width, j0, hi, n, first, base, q, m_i, l_i, acc,
                                    scale, D, BS, NB, IEEE)  # fmt: skip
    else:  # the interpreter (tests) cannot index a range by a loaded bound: the same iterations as a while loop
        j0 = lo
        while j0 < hi:
            m_i, l_i, acc = _blocks(k_ptr, v_ptr, tables_ptr, b, m_width, j0, hi, n, first, base, q, m_i, l_i, acc,
                                    scale, D, BS, NB, IEEE)  # fmt: skip
            j0 += NB
    out = acc / tl.where(l_i == 0, 1.0, l_i)[:, None]
    lse = tl.where(l_i == 0, float("-inf"), m_i + tl.log(l_i))
    if ONE:  # the row's only split: its output as the merge would write it (w = 1), no partials
        tl.store(out_ptr + (b * HQ + qh)[:, None] * D + dd[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=(rows < G)[:, None])  # fmt: skip
        return
    row_off = (b * HQ + qh) * SPLITS + s
    tl.store(o_ptr + row_off[:, None] * D + dd[None, :], out, mask=(rows < G)[:, None])
    tl.store(lse_ptr + row_off, lse, mask=rows < G)
    if LAST:
        # every thread's stores are issued (barrier), then one gpu-scope release: the program that counts last sees
        # all splits' partials (acquire), merges them as _merge_kernel does and leaves the counter at 0 for the next
        # launch; its loads bypass L1 (.cg), which may hold nothing of other programs' writes
        cnt = cnt_ptr + b * (HQ // G) + h
        tl.debug_barrier()
        done = tl.atomic_add(cnt, 1, sem="acq_rel", scope="gpu")
        tl.debug_barrier()
        if done == SPLITS - 1:
            for gi in tl.static_range(G):
                _merge_row(o_ptr, lse_ptr, out_ptr, b * HQ + h * G + gi, SPLITS, SP, D, ".cg")
            tl.atomic_xchg(cnt, 0, sem="relaxed", scope="gpu")


@triton.jit
def _merge_row(o_ptr, lse_ptr, out_ptr, r, SPLITS: tl.constexpr, SP: tl.constexpr, D: tl.constexpr,
               CACHE: tl.constexpr):  # fmt: skip
    """Row r's (a (row, query head) pair) splits merged by log-sum-exp weights, written in the output dtype."""
    ss = tl.arange(0, SP)
    dd = tl.arange(0, D)
    lse = tl.load(lse_ptr + r * SPLITS + ss, mask=ss < SPLITS, other=float("-inf"), cache_modifier=CACHE)
    m = tl.max(lse, 0)
    w = tl.exp(lse - tl.where(m == float("-inf"), 0.0, m))  # empty splits: exp(-inf) = 0
    o = tl.load(o_ptr + (r * SPLITS + ss)[:, None] * D + dd[None, :], mask=(ss < SPLITS)[:, None], other=0.0,
                cache_modifier=CACHE)  # fmt: skip
    total = tl.sum(w, 0)
    out = tl.sum(o * w[:, None], 0) / tl.where(total == 0, 1.0, total)
    tl.store(out_ptr + r * D + dd, out.to(out_ptr.dtype.element_ty))


@triton.jit
def _merge_kernel(
    o_ptr,  # [B * HQ, SPLITS, D] fp32 partial outputs
    lse_ptr,  # [B * HQ, SPLITS] fp32 (-inf: a split that saw no token)
    out_ptr,  # [B * HQ, D] in q's dtype
    SPLITS: tl.constexpr,
    SP: tl.constexpr,  # SPLITS padded to a power of two
    D: tl.constexpr,
    PDL: tl.constexpr,
    EARLY: tl.constexpr,
):
    """The splits of one (row, query head) merged by log-sum-exp weights, written in the output dtype: one
    launch where torch's softmax, multiply, sum and cast took four (0.27 ms of an 8B step at batch 1)."""
    pdl_start(PDL, EARLY)
    _merge_row(o_ptr, lse_ptr, out_ptr, tl.program_id(0), SPLITS, SP, D, "")


# counters: scratch the kernel leaves as it found it (all 0), so not declared as mutated (a declared mutation would
# have torch.compile clone it around each call)
@torch.library.custom_op("lorafast::paged_decode", mutates_args=())
def paged_decode(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    block_size: int,
    window: int,
    splits: int = 0,
    pdl: bool = False,
    early: bool = False,
    counters: torch.Tensor | None = None,
    blocks: int = 1,
) -> torch.Tensor:
    """q [B, hq, d]; pools [hkv, slots, d]; block_tables [B, M]; seq_lens [B] → [B, hq, d] (q's dtype).
    window <= 0: no sliding window. splits: context splits (0: decode_plan's splits and blocks for B rows).
    Each row's result depends only on its own inputs and on (splits, blocks, M): a verify that runs its k + 1
    query tokens as rows with the plan of the one-token step computes each token as that step does. pdl: both kernels as
    programmatic dependent launches (sm90+, paged.use_kernel_pdl): each waits for the kernel before it first;
    early (with pdl; option fused_pdl): each lets the next kernel launch before its wait (`pdl_start`).
    counters (option attn_last_merges; int32, all 0, at least B x hkv of them): one kernel, whose last program of
    each (row, kv head) merges the splits, instead of a second merge kernel; the same arithmetic. blocks: cache
    blocks a program's loop takes at once (one dot over blocks x block_size keys; `decode_plan`). With one split
    (and no counters) the kernel writes the output itself, the bits the merge of one split would write."""
    launch = {"PDL": pdl, "EARLY": pdl and early} | ({"launch_pdl": True} if pdl else {})
    b, hq, d = q.shape
    hkv, slots, _ = k_pool.shape
    g = hq // hkv
    width = block_tables.shape[1]
    if not splits:
        splits, blocks = decode_plan(b, hkv, width)
    sp = triton.next_power_of_2(splits)
    last = counters is not None and counters.numel() >= b * hkv
    one = splits == 1 and not last
    out = torch.empty(b, hq, d, device=q.device, dtype=q.dtype)
    o = out if one else torch.empty(b, hq, splits, d, device=q.device, dtype=torch.float32)  # unused when one
    lse = out if one else torch.empty(b, hq, splits, device=q.device, dtype=torch.float32)
    _paged_decode_kernel[(b, hkv, splits)](
        q.contiguous(),
        k_pool,
        v_pool,
        block_tables.contiguous(),
        seq_lens.contiguous(),
        o,
        lse,
        counters if last else lse,  # unused without LAST
        out,
        slots,
        width,
        window,
        d**-0.5,
        HQ=hq,
        G=g,
        GP=max(16, triton.next_power_of_2(g)),
        D=d,
        BS=block_size,
        SPLITS=splits,
        PER=-(-width // splits),
        NB=blocks,
        IEEE=q.dtype == torch.float32,
        LAST=last,
        SP=sp,
        ONE=one,
        LOOP=not _INTERPRET,
        **launch,
    )
    if not (last or one):
        _merge_kernel[(b * hq,)](o, lse, out, SPLITS=splits, SP=sp, D=d, **launch)
    return out


@paged_decode.register_fake
def _(
    q,
    k_pool,
    v_pool,
    block_tables,
    seq_lens,
    block_size,
    window,
    splits=0,
    pdl=False,
    early=False,
    counters=None,
    blocks=1,
):
    return torch.empty_like(q)
