"""Attention for the paged runtime: SDPA for prefill, attention over the paged pool for decode and chunks.

Paged kernels (same inputs, same result; bench/TORCH.md has the measurements):
- `paged_attention` / `decode_gather`: gathers each sequence's blocks into a dense [B, kv_heads, T, d] copy
  (T = table width x block size), then a written-out masked attention; S query tokens per row (a decode
  step, a speculative verify, a chunk). Simple, works everywhere, but copies the KV (1.9 of 9.4 ms per
  8B decode step at batch 32 on an H200) and always attends over the padded width.
- `runtime/triton_attention.py`: a Triton decode kernel reading the pool in place (opt-in, CUDA).
- `chunk_attention`: a later chunk of one long prompt (chunked prefill): SDPA over its gathered k/v with the
  causal mask shifted by the cached prefix.
- `decode_flex`: FlexAttention reads the pool in place: a BlockMask lists each sequence's physical blocks
  (block size = cache block size), so it touches only the blocks a sequence owns. EXPERIMENTAL, not
  selectable through the options: eager it matches `decode_gather` (tested), but compiled it gave wrong
  outputs on CPU (torch 2.13) and on an H200 (torch 2.11), and it was no faster there (bench/TORCH.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

from lorafast_export.model.decoder import causal_mask, rotate_half


def project_qkv(attn, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """attn: decoder Attention module; x [b, s, hidden] → q [b, hq, s, d], k, v [b, hkv, s, d] (rope applied).
    Uses the fused `qkv_proj` (runtime/fuse.py) when the loader made one."""
    if getattr(attn, "qkv_proj", None) is not None:
        return rope_qkv(attn, attn.qkv_proj(x), cos, sin)
    q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
    return _rope(attn, q, k, v, cos, sin)


def rope_qkv(attn, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """The fused projection's output qkv [b, s, (hq + 2 hkv) d] → q, k (rope applied), v as project_qkv."""
    hq, hkv = attn.n_heads * attn.head_dim, attn.n_kv * attn.head_dim
    q, k, v = qkv.split([hq, hkv, hkv], dim=-1)
    return _rope(attn, q, k, v, cos, sin)


def _rope(attn, q, k, v, cos, sin):
    b, s, _ = q.shape
    d = attn.head_dim
    q = q.view(b, s, attn.n_heads, d).transpose(1, 2)
    k = k.view(b, s, attn.n_kv, d).transpose(1, 2)
    v = v.view(b, s, attn.n_kv, d).transpose(1, 2)
    cos, sin = cos[:, None], sin[:, None]  # [b, 1, s, d]
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin, v


# The SDPA backends a CUDA prefill may use, in PyTorch's order of preference (None: all of them). cuDNN's is left
# out: bench/TORCH.md, session 15.
PREFILL_SDPA_BACKENDS: list[SDPBackend] | None = [
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.MATH,
]


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None) -> torch.Tensor:
    """Causal self-attention over the whole prompt. q [b, hq, s, d], k/v [b, hkv, s, d] → [b, hq, s, d]."""
    if q.is_cuda and PREFILL_SDPA_BACKENDS is not None:
        with sdpa_kernel(PREFILL_SDPA_BACKENDS):
            return _sdpa_causal(q, k, v, window)
    return _sdpa_causal(q, k, v, window)


def _sdpa_causal(q, k, v, window):
    s = q.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if window is None or window >= s:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    mask = causal_mask(s, 0, q.device, window)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


def chunk_attention(q, k_pool, v_pool, seen: torch.Tensor, mask) -> torch.Tensor:
    """A later chunk of one prompt (chunked prefill): q [1, hq, S, d] at the S positions after `past` keys of
    the sequence, whose k/v (the chunk's included) sit at pool slots seen [past + S]; mask: chunk_mask's
    → [1, hq, S, d]. SDPA over the gathered k/v."""
    g = q.shape[1] // k_pool.shape[0]
    # [1, hq, past + S, d]: the kv heads repeated for their query heads, as SDPA's memory-efficient kernel
    # takes a mask but not grouped heads (the math kernel would materialize every score)
    k, v = (pool[:, seen][None].repeat_interleave(g, dim=1) for pool in (k_pool, v_pool))
    if q.is_cuda and PREFILL_SDPA_BACKENDS is not None:
        with sdpa_kernel(PREFILL_SDPA_BACKENDS):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def chunk_mask(s: int, past: int, device, window: int | None):
    """chunk_attention's mask for S queries after `past` keys: the causal mask shifted by `past` (a key is
    visible to a query at or after it, within the window). Without a window, SDPA's lower-right causal bias,
    which the flash and memory-efficient kernels apply without a mask tensor (the math kernel, on the CPU,
    materializes it). Built outside the compiled chunk layer and passed in: dynamo cannot construct it."""
    return causal_lower_right(s, past + s) if window is None else causal_mask(s, past, device, window)


def packed_attention(q, k, v, seg_index: torch.Tensor, seg_flat: torch.Tensor, window: int | None):
    """Causal attention within each of several prompts packed back to back: q [1, hq, T, d], k/v
    [1, hkv, T, d] → [1, hq, T, d]. The prompts are gathered into a right-padded [b, h, L, d] grid
    (seg_index [b, L], runtime/paged.py's pack_segments), attended (causal: no real position sees the
    padding after it), and the real positions read back (seg_flat [T]). Only the attention pays for the
    padding; the linears around it run on the T packed tokens."""
    hq, d = q.shape[1], q.shape[3]
    b, longest = seg_index.shape

    def grid(x):  # [1, h, T, d] → [b, h, L, d]
        return x[0][:, seg_index].transpose(0, 1)

    o = prefill_attention(grid(q), grid(k), grid(v), window)  # [b, hq, L, d]
    return o.transpose(0, 1).reshape(hq, b * longest, d)[:, seg_flat][None]


FITTED_SMS = 132  # the H100's SMs, where decode_plan was fitted; paged.use_device_sms gives a layer its GPU's


def num_splits(batch: int, kv_heads: int, width: int, sms: int = FITTED_SMS) -> int:
    """Sessions 9-38's context splits of the Triton decode kernel (one cache block an iteration): batch x
    kv_heads x splits fills the GPU about twice, at most one per block. decode_plan's plan below PLAN_MIN_ROWS,
    the baseline of torch_bench's attnplan sweep and bench/results/s39_plan.py, and the plan of the tests that
    need several splits."""
    return max(1, min(width, -(-2 * sms // (batch * kv_heads)), 32))


# Below this many (row, kv head) pairs a step keeps sessions 9-38's plan (num_splits x 1 block): end to end on an H100
# (session 40, 8B, 128-token prompts) the fitted plan took an int4 + int8-head batch-1 step from 2.095 to 2.127 ms
# (two runs), while at batch 32 it took a bf16 step from 6.78 to 6.60 ms; bench/TORCH.md.
PLAN_MIN_ROWS = 64


def decode_plan(batch: int, kv_heads: int, width: int, sms: int = FITTED_SMS) -> tuple[int, int]:
    """(context splits, cache blocks an iteration) of the Triton decode kernel for a step of `batch` rows over
    block tables `width` entries wide. Steps of fewer than PLAN_MIN_ROWS (row, kv head) pairs: num_splits' plan,
    one block an iteration (measured end to end, PLAN_MIN_ROWS). From there the rule fitted to the H100 sweep of
    session 39 (bench/TORCH.md, torch_bench --sections attnplan: within 7% of the best of 24 plans at each of 12
    (batch, context) points, 8B shape). Splits: the most
    that keep the programs (batch x kv_heads x splits) under twice the SMs and at least 4 table entries a split, a
    power of two, at most 32; tables of up to 8 entries take one (the kernel then writes the output itself: no
    merge kernel). Blocks: a split's whole share in one iteration while the programs fit in one wave and the share
    is at most 8 entries, else 4 an iteration; rounded up to a power of two (a table width the engine did not round,
    max_blocks, can leave a share of 3, 5, 6 or 7). sms: the GPU's streaming multiprocessors (the runtime passes its
    GPU's, paged.use_device_sms; the sweep's H100 has 132)."""
    rows = batch * kv_heads
    if rows < PLAN_MIN_ROWS:
        return num_splits(batch, kv_heads, width, sms), 1
    splits = 1 if width <= 8 else max(1, min(2 * sms // rows, width // 4, 32))
    splits = 1 << (splits.bit_length() - 1)
    per = -(-width // splits)
    blocks = per if rows * splits <= sms and per <= 8 else min(4, per)
    return splits, 1 << (blocks - 1).bit_length()  # a power of two (the kernel's tile); past `per`: masked


def write_kv(pool: torch.Tensor, slots: torch.Tensor, new: torch.Tensor) -> None:
    """pool [hkv, S, d] ← new [b, hkv, s, d] at slots [b * s] (row-major over b, s)."""
    pool.index_copy_(1, slots, new.permute(1, 0, 2, 3).reshape(pool.shape[0], -1, pool.shape[2]))


def paged_attention(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    block_tables: torch.Tensor,
    q_start: torch.Tensor,
    block_size: int,
    window: int | None = None,
) -> torch.Tensor:
    """q [B, hq, S, d] at positions q_start[b] + s; pools [hkv, slots, d]; block_tables [B, M] → [B, hq, S, d].

    Query s of row b attends to the row's tokens 0..q_start[b] + s (its own k/v must already be in the pool):
    S = 1 is a decode step, S > 1 a chunk (a speculative verify, a chunk of a prompt) on top of a cached
    prefix. Gathers each row's blocks into a dense [B, hkv, M * block_size, d] copy, then a written-out
    attention (matmul, masked fp32 softmax, matmul): with a mask, SDPA picked cuDNN attention on an H200,
    which inductor can only call as a fallback kernel."""
    b, hq, s, d = q.shape
    n_kv = k_pool.shape[0]
    offs = torch.arange(block_size, device=q.device)
    tok = (block_tables.long()[:, :, None] * block_size + offs).view(b, -1)  # [B, T]
    k = k_pool[:, tok].transpose(0, 1)  # [B, hkv, T, d]
    v = v_pool[:, tok].transpose(0, 1)
    kpos = torch.arange(tok.shape[1], device=q.device)[None, None]  # [1, 1, T]
    qpos = (q_start[:, None] + torch.arange(s, device=q.device)[None])[:, :, None]  # [B, S, 1]
    valid = kpos <= qpos
    if window is not None:
        valid = valid & (kpos > qpos - window)
    g = hq // n_kv  # query heads sharing one kv head become that head's query rows
    qg = q.reshape(b, n_kv, g * s, d)
    scores = torch.matmul(qg, k.transpose(-1, -2)).float() * d**-0.5  # [B, hkv, g*S, T]
    scores = scores.view(b, n_kv, g, s, -1).masked_fill(~valid[:, None, None], float("-inf"))
    p = torch.softmax(scores, dim=-1).view(b, n_kv, g * s, -1).to(v.dtype)
    return torch.matmul(p, v).reshape(b, hq, s, d)


def decode_gather(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    block_size: int,
    window: int | None = None,
) -> torch.Tensor:
    """One decode step: q [B, hq, 1, d]; seq_lens [B] (the new token included) → [B, hq, 1, d]."""
    return paged_attention(q, k_pool, v_pool, block_tables, seq_lens - 1, block_size, window)


def decode_flex(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    block_size: int,
) -> torch.Tensor:
    """FlexAttention over the pool in place; same contract as decode_gather (no sliding window)."""
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    b, m = block_tables.shape
    slots = k_pool.shape[1]
    n_blocks = (seq_lens + block_size - 1) // block_size  # [B]
    # physical block → logical block of each sequence (M for blocks it does not own). Eager flex ignores the
    # block list and applies mask_mod alone, so mask_mod must be the whole truth, not only the last block.
    logical = torch.arange(m, device=q.device).expand(b, m)
    owner = torch.full((b, slots // block_size), m, dtype=torch.long, device=q.device)
    owner = owner.scatter_reduce(1, block_tables.long(), logical, "amin")  # [B, blocks]

    def mask_mod(b, h, q_idx, kv_idx):
        return owner[b, kv_idx // block_size] * block_size + kv_idx % block_size < seq_lens[b]

    # the mask's kv extent must cover the whole pool: list width = pool blocks (entries past n_blocks unused)
    kv_indices = F.pad(block_tables.int(), (0, slots // block_size - m))[
        :, None, None, :
    ]  # [B, 1, 1, blocks]
    mask = BlockMask.from_kv_blocks(
        n_blocks[:, None, None].int(),
        kv_indices,
        BLOCK_SIZE=(128, block_size),
        mask_mod=mask_mod,
        seq_lengths=(1, slots),
    )
    return flex_attention(
        q, k_pool[None], v_pool[None], block_mask=mask, enable_gqa=q.shape[1] != k_pool.shape[0]
    )
