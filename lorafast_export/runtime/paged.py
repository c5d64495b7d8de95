"""The canonical decoder's weights run over the paged KV cache: prefill (SDPA), decode steps and chunks.

`build_model` assembles a Decoder from fp tensors (HF names) plus QTensors lowered to runtime linears, with
q/k/v and gate/up fused into one matmul each (runtime/fuse.py). `PagedModel` reuses the decoder's modules
(norms, projections, MLP, rotary) and replaces only attention. Its `forward` is the decode step and
`extend` runs S tokens per row on top of each row's cached prefix (a speculative verify, a prompt chunk).
The per-layer function is what `compile_layers` hands to torch.compile: the 32 layers of a Llama share one
compiled graph (regional compilation), and the engine captures the whole step in one CUDA graph.
"""

from __future__ import annotations

import logging
import types

import torch
import torch.nn.functional as F
from torch import nn

from lorafast_export.errors import InputError
from lorafast_export.model.decoder import Decoder, Rotary
from lorafast_export.model.spec import LM_HEAD, ModelConfig
from lorafast_export.qform import concat_qtensors
from lorafast_export.runtime.attention import (
    FITTED_SMS,
    chunk_attention,
    chunk_mask,
    decode_flex,
    decode_plan,
    packed_attention,
    paged_attention,
    prefill_attention,
    project_qkv,
    write_kv,
)
from lorafast_export.runtime.fuse import fused_dense, fusion_groups
from lorafast_export.runtime.kv_cache import PagedKVCache
from lorafast_export.runtime.linear import Int4TritonLinear, lower_qtensor

log = logging.getLogger(__name__)

VERIFY_MAX = 8  # an extend of up to this many tokens per row runs the Triton decode kernel per token


def _set_module(root: nn.Module, path: str, module: nn.Module | None) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def _fuse_quantized(dec, q, fp, device, dtype, kernel, kernels, lowered: set) -> dict:
    """Lower fusable groups of QTensors into one linear each; returns the module paths left to lower alone.
    q may be lazy (read from disk at each lookup): only the group being lowered is on the host at a time."""
    rest = dict.fromkeys(q)
    for parent, parts, name in fusion_groups(dec.cfg.num_layers):
        if not all(p in rest for p in parts):
            continue
        qt = concat_qtensors([q[p] for p in parts], [fp.get(f"{p}.bias") for p in parts])
        if qt is None:
            continue
        mod = lower_qtensor(qt, device, dtype, kernel)
        _set_module(dec, f"{parent}.{name}", mod)
        lowered.add(f"{parent}.{name}")
        for p in parts:
            del rest[p]
            fp.pop(f"{p}.bias", None)
            _set_module(dec, p, None)
            kernels[p] = mod.kernel
    return list(rest)


def _fuse_dense(dec: Decoder) -> None:
    for parent, parts, name in fusion_groups(dec.cfg.num_layers):
        mods = [dec.get_submodule(p) if _has(dec, p) else None for p in parts]
        if all(type(m) is nn.Linear for m in mods):
            _set_module(dec, f"{parent}.{name}", fused_dense(mods))
            for p in parts:
                _set_module(dec, p, None)


def _has(root: nn.Module, path: str) -> bool:
    parent, _, name = path.rpartition(".")
    return getattr(root.get_submodule(parent), name, None) is not None


def build_model(
    cfg: ModelConfig,
    fp: dict[str, torch.Tensor],
    q: dict | None,
    device,
    dtype: torch.dtype,
    kernel: str = "auto",
    source: str = "model",
    fuse: bool = True,
) -> tuple[Decoder, dict[str, str]]:
    """Decoder on `device` in `dtype`: fp tensors by HF name, QTensors (module path → QTensor) lowered to
    runtime linears. Returns (decoder, {module path: kernel}). Missing or unexpected tensors are an error.
    fuse: q/k/v and gate/up become one linear each where their parts allow it (runtime/fuse.py)."""
    q = q or {}
    with torch.device("meta"):
        dec = Decoder(cfg)
    fp = dict(fp)
    if cfg.tie_word_embeddings:
        fp.pop(LM_HEAD, None)
    kernels: dict[str, str] = {}
    quantized = set(q)  # module paths whose tensors come from a runtime linear, not from fp
    rest = _fuse_quantized(dec, q, fp, device, dtype, kernel, kernels, quantized) if fuse else list(q)
    for path in rest:
        mod = lower_qtensor(q[path], device, dtype, kernel, bias=fp.pop(f"{path}.bias", None))
        _set_module(dec, path, mod)
        kernels[path] = mod.kernel
    state = {k: v.to(device=device, dtype=dtype) for k, v in fp.items()}
    res = dec.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in res.missing_keys if not any(k.startswith(p + ".") for p in quantized)]
    if missing or res.unexpected_keys:
        raise InputError(
            f"{source}: tensors do not match a {cfg.family} model: missing {missing[:8]}, "
            f"unexpected {res.unexpected_keys[:8]}. Re-export the artifact."
        )
    if fuse:
        _fuse_dense(dec)
    dec.rotary = Rotary(cfg).to(device)
    return dec.eval(), kernels


class RopeTable(nn.Module):
    """The decoder's Rotary at positions 0..n-1, computed once by that module (the same values) into two tables,
    then looked up: a step's cos and sin are a clamp and two gathers instead of the seven kernels that compute
    them (position x frequency, cat, cos, sin, the scale twice, two casts: ~12 us of an 8B decode step on an
    H100, bench/TORCH.md session 38). A position past the table (a padding row's, past max_seq_len, which the
    engine never gives a request) reads its last row; another dtype computes them."""

    def __init__(self, rotary: Rotary, n: int, dtype: torch.dtype):
        super().__init__()
        self.rotary, self.n, self.dtype = rotary, n, dtype
        self.cos, self.sin = rotary(torch.arange(n, device=rotary.inv_freq.device), dtype)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if dtype != self.dtype:
            return self.rotary(position_ids, dtype)
        idx = position_ids.clamp(max=self.n - 1)
        return self.cos[idx], self.sin[idx]


def run_mlp(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The decoder MLP, through the fused gate_up_proj when the loader made one."""
    if getattr(mlp, "gate_up_proj", None) is None:
        return mlp(x)
    gate, up = mlp.gate_up_proj(x).chunk(2, dim=-1)
    return mlp.down_proj(F.silu(gate) * up)


def _block_parts(layer, h, cos, sin, attend):
    """One decoder layer around an attention callable attend(q, k, v) → [b, hq, s, d]; returns (h after
    the attention's residual add, the MLP's output): the layer's output is their sum."""
    b, s, _ = h.shape
    q, k, v = project_qkv(layer.self_attn, layer.input_layernorm(h), cos, sin)
    a = attend(q, k, v)
    h = h + layer.self_attn.o_proj(a.transpose(1, 2).reshape(b, s, -1))
    return h, run_mlp(layer.mlp, layer.post_attention_layernorm(h))


FUSED_MAX_ROWS = 8  # rows (batch x tokens) up to which a fused layer can run runtime/triton_fused.py
NORM_MAX_K = 16384  # the widest row runtime/triton_fused.add_rms_norm holds in one program (logits_of)


def _fusion_linears(layer) -> list | None:
    """The layer's qkv, o, gate_up and down linears when fused_parts can take them: fused qkv_proj and gate_up_proj
    (runtime/fuse.py), no bias but qkv's (a Qwen2); else None."""
    attn, mlp = layer.self_attn, layer.mlp
    lins = [getattr(attn, "qkv_proj", None), attn.o_proj, getattr(mlp, "gate_up_proj", None), mlp.down_proj]
    if any(m is None for m in lins) or any(getattr(m, "bias", None) is not None for m in lins[1:]):
        return None
    return lins


def _plain_int4(m) -> bool:
    """Our Triton int4 linear (`Int4TritonLinear`) with no act-order permutation or activation quantization."""
    return type(m) is Int4TritonLinear and m.perm is None and m.act_quant is None


def fusable_layer(layer) -> bool:
    """Whether `fused_parts` can run this layer through runtime/triton_fused.py's or triton_fused_int4.py's ops:
    `_fusion_linears`, and either every linear dense in the norms' dtype, or every linear an `_int4_fusable`
    one."""
    lins = _fusion_linears(layer)
    if lins is None:
        return False
    dtype = layer.input_layernorm.weight.dtype
    if all(isinstance(m, nn.Linear) for m in lins):
        return all(m.weight.dtype == dtype for m in lins)
    return all(_int4_fusable(op, m, dtype) for op, m in zip(FUSED_INT4_OPS, lins, strict=True))


def mma_layouts(layer) -> list | None:
    """The fused CUDA MMA kernels' layouts (runtime/cuda_int4.py's fused ops) for this layer's qkv, o and
    gate_up, or None where they cannot run it: every linear an int4 one whose plan runs the MMA kernel, no
    act-order permutation or activation quantization, no bias but qkv's, bf16 or fp16, a layout measured for
    each of the three shapes on this GPU (int4_table.fused_mma_layout: fusing must never be slower than not),
    and each fused variant compiled here (at load; a failure is logged once and the layer keeps the unfused
    kernels). Imports nothing heavy off CUDA."""
    lins = _fusion_linears(layer)
    dtype = layer.input_layernorm.weight.dtype
    # weight_frags: the linear's plan runs the MMA kernel somewhere (it packs them only then)
    if (
        lins is None
        or dtype not in (torch.bfloat16, torch.float16)
        or not all(_plain_int4(m) and m.weight_frags is not None for m in lins)
    ):
        return None
    from lorafast_export.runtime import cuda_int4, int4_table

    ops = (cuda_int4.QKV_OP, cuda_int4.O_OP, cuda_int4.GLU_OP)
    gpu = torch.cuda.get_device_name(lins[0].weight_frags.device)
    lays = []
    for op, m in zip(ops, lins, strict=False):
        lay = int4_table.fused_mma_layout(gpu, op, m.out_features, m.in_features)
        if lay is None:
            return None
        hd = layer.self_attn.head_dim if op == cuda_int4.QKV_OP else 0
        why = cuda_int4.fused_unready(op, m, lay, dtype, getattr(m, "bias", None) is not None, hd)
        if why is not None:
            if why not in _MMA_FUSED_WARNED:
                _MMA_FUSED_WARNED.add(why)
                log.warning("int4 fused MMA kernels unavailable, the unfused kernels run instead: %s", why)
            return None
        lays.append(lay)
    return lays


_MMA_FUSED_WARNED: set[str] = set()


FUSED_INT4_OPS = ("add_norm_qkv_rope", "gemv_add", "norm_glu", "gemv")  # qkv, o, gate_up, down's fused op


def _int4_fusable(op: str, m, dtype: torch.dtype) -> bool:
    """An int4 linear runtime/triton_fused_int4.py's `op` runs in fused_parts: our Triton int4 linear with the
    word layout, groups of whole 128-column tiles, no act-order permutation or activation quantization, bf16
    or fp16 activations, and a tile measured for its shape on this GPU (an unmeasured shape keeps its plan's
    kernels: fusing must never be slower than not). Imports Triton."""
    if not _plain_int4(m) or dtype not in (torch.bfloat16, torch.float16):
        return False
    from lorafast_export.runtime import triton_fused_int4 as f4

    return (
        m.weight_words is not None
        and m.group_size % f4.WORD_COLS == 0
        and f4.measured(op, m.out_features, m.in_features)
    )


def _int4(m) -> tuple:
    """An int4 linear's arguments to runtime/triton_fused_int4.py's ops: (words, scales, zero points, scale/zero
    words, group size)."""
    return m.weight_words, m.scales, m.zeros, m.scale_zero_words, m.group_size


def _mma(m, lay) -> tuple:
    """An int4 linear's arguments to runtime/cuda_int4.py's fused ops: (fragments, scales, zero points, K,
    group size, layout)."""
    return m.weight_frags, m.scales, m.zeros, m.in_features, m.group_size, lay


def fused_parts(layer, h, delta, cos, sin, k_pool, v_pool, slots, attend):
    """`_block_parts` of the layer input h + delta through the fused kernels (runtime/triton_fused.py, or
    runtime/triton_fused_int4.py's for an int4 layer): the residual add, RMSNorm, qkv product, rope and the k/v
    write into the pools at slots in one kernel, o_proj with its residual add, RMSNorm + gate/up + silu-mul in
    one, down_proj; attend(q) reads the pools. For rows <= 8 (the layer's `fused_rows`, set by
    use_fused_decode) of a `fusable_layer`."""
    b, s, hid = h.shape
    attn, mlp = layer.self_attn, layer.mlp
    n1, n2 = layer.input_layernorm, layer.post_attention_layernorm
    ops = torch.ops.lorafast
    d = attn.head_dim
    rope = (cos.reshape(-1, d), sin.reshape(-1, d), k_pool, v_pool, slots, attn.n_heads * d)
    qkv, o, gate_up, down = attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj
    hx, dx = h.reshape(-1, hid), delta.reshape(-1, hid)
    dense = isinstance(o, nn.Linear)
    lays = getattr(layer, "mma_fused", None)  # use_fused_decode's: the CUDA MMA kernels' fused ops
    pdl = getattr(layer, "fused_pdl", False)  # use_kernel_pdl's, for the dense ops
    mma = getattr(layer, "fused_mma", False)  # use_fused_decode's: the dense ops on the tensor cores
    if dense:
        x, q = ops.add_norm_qkv_rope(hx, dx, n1.weight, qkv.weight, n1.eps, qkv.bias, *rope, pdl, mma)
    elif lays is not None:
        x, q = ops.mma_add_norm_qkv_rope(hx, dx, n1.weight, *_mma(qkv, lays[0]), n1.eps, qkv.bias, *rope)
    else:
        x, q = ops.add_norm_qkv_rope_int4(hx, dx, n1.weight, *_int4(qkv), n1.eps, qkv.bias, *rope)
    a = attend(q.view(b, s, attn.n_heads, d).transpose(1, 2)).transpose(1, 2).reshape(b * s, -1)
    if dense:
        h = ops.gemv_add(a, o.weight, x, pdl, mma)
        act = ops.norm_glu(h, n2.weight, gate_up.weight, n2.eps, pdl, mma)
        out = ops.fused_gemv(act, down.weight, pdl, mma)
    elif lays is not None:
        h = ops.mma_gemv_add(a, *_mma(o, lays[1]), x)
        act = ops.mma_norm_glu(h, n2.weight, *_mma(gate_up, lays[2]), n2.eps)
        out = down(act)  # the plain MMA kernel, through the layer's plan
    else:
        h = ops.gemv_add_int4(a, *_int4(o), x)
        act = ops.norm_glu_int4(h, n2.weight, *_int4(gate_up), n2.eps)
        out = ops.fused_gemv_int4(act, *_int4(down))
    return h.view(b, s, hid), out.view(b, s, hid)


def _block(layer, h, cos, sin, attend):
    h, mlp_out = _block_parts(layer, h, cos, sin, attend)
    return h + mlp_out


def paged_layer(
    layer,
    h,
    delta,
    cos,
    sin,
    k_pool,
    v_pool,
    block_tables,
    q_start,
    slots,
    block_size: int,
    window,
    kind="gather",
    lens=None,
):
    """One layer over the paged cache: its input is h + delta [B, S, hidden] (the previous layer's two
    parts: its residual add runs here, fused by inductor with this layer's first RMSNorm: one kernel per
    layer fewer) at positions q_start[b] + s; writes k/v at slots [B*S] first, then attends to each row's
    prefix and itself; returns (h, delta) for the next layer. The unit torch.compile sees (regional).
    kind="triton": a decode step (S = 1) reads the pool in place (runtime/triton_attention.py), and so
    does a verify of S <= VERIFY_MAX tokens, each token a row of the same kernel with the split count of
    a one-token step at this batch: token s computes what a decode step at its position would."""

    def attend(q, k=None, v=None):  # k, v None: fused_parts wrote them
        if k is not None:
            write_kv(k_pool, slots, k)
            write_kv(v_pool, slots, v)
        b, hq, s, d = q.shape
        if kind == "triton" and s <= VERIFY_MAX:  # S > 1: each query token as a row of the decode kernel
            sms = getattr(layer, "attn_sms", FITTED_SMS)  # use_device_sms: this GPU's
            splits, blocks = decode_plan(b, k_pool.shape[0], block_tables.shape[1], sms)  # a 1-token step's
            o = torch.ops.lorafast.paged_decode(
                q.transpose(1, 2).reshape(b * s, hq, d),
                k_pool,
                v_pool,
                block_tables.repeat_interleave(s, 0) if s > 1 else block_tables,
                lens if lens is not None else query_lens(q_start, s),
                block_size,
                window or 0,
                splits,
                getattr(layer, "attn_pdl", False),
                getattr(layer, "fused_pdl", False),  # the next kernel launches early (use_kernel_pdl's dense)
                # one kernel: its last programs merge (use_attn_last_merges)
                getattr(layer, "attn_counters", None),
                blocks,
            )
            return o.view(b, s, hq, d).transpose(1, 2)
        return paged_attention(q, k_pool, v_pool, block_tables, q_start, block_size, window)

    if h.shape[0] * h.shape[1] <= getattr(layer, "fused_rows", 0):
        return fused_parts(layer, h, delta, cos, sin, k_pool, v_pool, slots, attend)
    return _block_parts(layer, h + delta, cos, sin, attend)


def prefill_layer(layer, h, cos, sin, k_pool, v_pool, slots, window, seg_index=None, seg_flat=None):
    """One layer of a prefill from position 0: h [b, s, hidden] (rows right-padded), or several prompts
    packed back to back in h [1, T, hidden] (seg_index given). Writes k/v at slots [b*s or T] unless
    k_pool is None. The unit `compile_prefill` hands to torch.compile (dynamic in the token count)."""

    def attend(q, k, v):
        if k_pool is not None:
            write_kv(k_pool, slots, k)
            write_kv(v_pool, slots, v)
        if seg_index is None:
            return prefill_attention(q, k, v, window)
        return packed_attention(q, k, v, seg_index, seg_flat, window)

    return _block(layer, h, cos, sin, attend)


def pack_segments(lens: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prompts of these lengths packed back to back: (positions [1, T], seg_index [b, L], seg_flat [T]) on
    the CPU. seg_index[i, j] is the packed index of token j of prompt i (past its end: the prompt's last
    token, never attended to by a real position); seg_flat[t] is where packed token t sits in the [b * L]
    grid (see packed_attention)."""
    longest, b = max(lens), len(lens)
    starts = torch.tensor([0, *lens[:-1]]).cumsum(0)
    n = torch.tensor(lens)
    j = torch.arange(longest)
    seg_index = starts[:, None] + torch.minimum(j[None], n[:, None] - 1)
    real = j[None] < n[:, None]
    seg_flat = torch.arange(b * longest).view(b, longest)[real]
    positions = j[None].expand(b, -1)[real][None]
    return positions, seg_index, seg_flat


def prefill_forward(
    dec: Decoder,
    ids,
    slots,
    k_pools,
    v_pools,
    last_only: bool = True,
    last_index=None,
    segments=None,
    layer_fn=prefill_layer,
) -> torch.Tensor:
    """ids [b, s] from position 0 → logits fp32 [b, V] (last position, or last_index[b] of each row) or
    [b, s, V]; writes k/v of every position at slots [b*s] of the per-layer pools (lists of [hkv, S, d])
    unless slots is None. Rows may be right-padded: causal attention keeps padding out of every real
    position (route its slots to the pad block, give last_index).
    segments = (positions [1, T], seg_index, seg_flat) from pack_segments: ids [1, T] holds several prompts
    back to back (no padding computed in the linears); last_index [b] then indexes T."""
    h = dec.embed(ids)
    if segments is None:
        pos = torch.arange(ids.shape[1], device=ids.device)[None].expand_as(ids)
        seg_index = seg_flat = None
    else:
        pos, seg_index, seg_flat = segments
    cos, sin = dec.rotary(pos, h.dtype)
    for i, layer in enumerate(dec.model.layers):
        kp, vp = (None, None) if slots is None else (k_pools[i], v_pools[i])
        h = layer_fn(layer, h, cos, sin, kp, vp, slots, dec.cfg.sliding_window, seg_index, seg_flat)
    if segments is not None:
        return dec.logits(h[0, last_index]).float()
    if last_index is not None:
        return dec.logits(h[torch.arange(h.shape[0], device=h.device), last_index]).float()
    return dec.logits(h[:, -1] if last_only else h).float()


def chunk_layer(layer, h, cos, sin, k_pool, v_pool, new, seen, mask):
    """One layer of a later chunk of one prompt (chunk_forward): writes the chunk's k/v at slots `new`, then
    attends over the keys at slots `seen` (those before the chunk it can see, then its own) under
    attention.chunk_mask's mask. The unit `compile_prefill` also compiles (dynamic in the chunk's length and
    its prefix)."""

    def attend(q, k, v):
        write_kv(k_pool, new, k)
        write_kv(v_pool, new, v)
        return chunk_attention(q, k_pool, v_pool, seen, mask)

    return _block(layer, h, cos, sin, attend)


def chunk_forward(
    dec: Decoder, ids, start: int, slots, k_pools, v_pools, layer_fn=chunk_layer
) -> torch.Tensor:
    """A later chunk of one prompt (chunked prefill, Engine.prefill_chunk): ids [1, S] at positions
    start..start+S-1, the prompt's first `start` tokens already in the pools; slots [start + S]: the slots of
    positions 0..start+S-1. Writes the chunk's k/v, attends to the prefix and causally within the chunk
    (attention.chunk_attention; a sliding window gathers only the keys it can see) → logits fp32 [1, V] of
    its last token."""
    s = ids.shape[1]
    h = dec.embed(ids)
    cos, sin = dec.rotary(torch.arange(start, start + s, device=ids.device)[None], h.dtype)
    window = dec.cfg.sliding_window
    lo = 0 if window is None else max(0, start - window + 1)  # the first key the chunk's first query sees
    new, seen = slots[start:], slots[lo:]
    mask = chunk_mask(s, start - lo, ids.device, window)
    for i, layer in enumerate(dec.model.layers):
        h = layer_fn(layer, h, cos, sin, k_pools[i], v_pools[i], new, seen, mask)
    return dec.logits(h[:, -1]).float()


def extend_forward(
    dec: Decoder,
    tokens,
    positions,
    block_tables,
    slots,
    k_pools,
    v_pools,
    block_size: int,
    layer_fn=paged_layer,
    kind: str = "gather",
) -> torch.Tensor:
    """tokens/positions [B, S] (positions consecutive per row), block_tables [B, M], slots [B*S] → logits
    fp32 [B, S, V]. Every row's tokens before positions[:, 0] must already be in the pools."""
    h = dec.embed(tokens)
    delta = torch.zeros_like(h)  # h + 0 is h exactly
    cos, sin = dec.rotary(positions, h.dtype)
    q_start = positions[:, 0]
    # the Triton kernel's visible lengths, once a step rather than in every layer (gather takes none)
    lens = query_lens(q_start, positions.shape[1]) if kind == "triton" else None
    for i, layer in enumerate(dec.model.layers):
        h, delta = layer_fn(
            layer,
            h,
            delta,
            cos,
            sin,
            k_pools[i],
            v_pools[i],
            block_tables,
            q_start,
            slots,
            block_size,
            dec.cfg.sliding_window,
            kind,
            lens=lens,
        )
    return logits_of(dec, h, delta).float()


def query_lens(q_start: torch.Tensor, s: int) -> torch.Tensor:
    """The visible length of each query token of S per row at positions q_start[b] + s: [B * S]."""
    return (q_start[:, None] + torch.arange(1, s + 1, device=q_start.device)).reshape(-1)


def logits_of(dec: Decoder, h: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """dec.logits(h + delta); through the fused kernel (final norm + lm_head) up to the decoder's `fused_rows`
    (use_fused_decode), and past them (or with a head that is not a plain product) the residual add and the final
    norm as one kernel (`norm_kernel`, runtime/triton_fused.add_rms_norm) before the head."""
    b, s, hid = h.shape
    if b * s <= getattr(dec, "fused_rows", 0):
        w, eps = dec.head_weight(), dec.model.norm.eps
        _, y = torch.ops.lorafast.add_norm_gemv(
            h.reshape(-1, hid),
            delta.reshape(-1, hid),
            dec.model.norm.weight,
            w,
            eps,
            getattr(dec, "fused_pdl", False),
            getattr(dec, "fused_mma", False),
        )
        return y.view(b, s, -1)
    if getattr(dec, "norm_kernel", False) and hid <= NORM_MAX_K:  # one kernel instead of torch's nine
        y = torch.ops.lorafast.add_rms_norm(
            h.reshape(-1, hid), delta.reshape(-1, hid), dec.model.norm.weight, dec.model.norm.eps
        )
        return dec.head(y).view(b, s, -1)
    return dec.logits(h + delta)


def use_fused_decode(dec: Decoder, rows: int = 1, mma: bool = False) -> int:
    """Every `fusable_layer` (and the head, when the lm_head is a plain product in the same dtype and every layer
    is fused) runs the fused kernels for products of at most `rows` rows (<= FUSED_MAX_ROWS), and at rows=1 every
    layer with `mma_layouts` the fused CUDA MMA ops (its `mma_fused`); returns how many layers. rows=1: the
    batch-1 decode step only (several rows are several programs over the same weight tile, slower than
    cuBLAS); a runtime that verifies a draft's tokens takes FUSED_MAX_ROWS, so that a verify row computes what
    its decode step computes. mma: the dense layers' and head's fused ops on the tensor cores (`fused_mma`) at
    every row count (option fused_decode=mma, or auto on an H100; loader.fused_mma_from). Their cost is about flat
    from 1 to 8 rows, so with mma the dense layers take FUSED_MAX_ROWS whatever `rows` is (an int4 layer's fused
    MMA ops keep `rows`). Registers the kernels' ops (imports Triton)."""
    import lorafast_export.runtime.triton_fused  # noqa: F401  (registers torch.ops.lorafast)

    if not 1 <= rows <= FUSED_MAX_ROWS:
        raise ValueError(f"use_fused_decode: rows={rows}, must be 1..{FUSED_MAX_ROWS}")
    mma = bool(mma)
    n = 0
    for layer in dec.model.layers:
        # the fused MMA ops at one row only: their norm is computed per block, which at 8 rows cost 2-2.5x the
        # plain products (bench/TORCH.md, session 20); a runtime that verifies drafts keeps the plain kernels
        layer.mma_fused = mma_layouts(layer) if rows == 1 else None
        if layer.mma_fused is not None:
            layer.fused_rows = rows
        elif fusable_layer(layer):  # dense: on the tensor cores (mma) every row count costs about one row's
            layer.fused_rows = FUSED_MAX_ROWS if mma else rows
        else:
            layer.fused_rows = 0
        layer.fused_mma = mma
        n += layer.fused_rows > 0
    head = dec.lm_head if dec.lm_head is not None else dec.model.embed_tokens
    plain_head = (
        n == len(dec.model.layers)
        and isinstance(head, (nn.Linear, nn.Embedding))
        and head.weight.dtype == dec.model.norm.weight.dtype
    )
    dec.fused_rows = (FUSED_MAX_ROWS if mma else rows) if plain_head else 0
    dec.norm_kernel = True  # logits_of: the final norm of the rows the fused head does not take, one kernel
    dec.fused_mma = mma
    return n


def use_kernel_pdl(dec: Decoder, device, dense: bool = False) -> int | None:
    """Our CUDA kernels of the decoder as programmatic dependent launches: each int4 linear's MMA plan entries
    and each layer's fused MMA ops (runtime/cuda_int4.py), the layers' paged decode attention
    (runtime/triton_attention.py, `attn_pdl`), and with `dense` (option fused_pdl) the dense fused ops of the
    layers and of the final norm + lm_head (runtime/triton_fused.py, `fused_pdl`), with the attention's kernels
    letting the next one launch before they wait. A kernel so launched may start while the one before it ends:
    it loads its weights (the dense ops: asks L2 for them), then waits for that kernel before reading
    activations or writing (bit-for-bit the same output; bench/TORCH.md sessions 21 and 25). Only where
    `cuda_int4.pdl_available` (an sm90+ GPU, a CUDA 12+ driver; elsewhere a no-op, returning None); after
    use_fused_decode. Returns how many linears' plans took it."""
    from lorafast_export.runtime import cuda_int4

    if not cuda_int4.pdl_available(device):
        return None
    from lorafast_export.runtime import triton_int4 as t4

    n = 0
    for m in dec.modules():
        if isinstance(m, Int4TritonLinear) and m.plan:  # entry j // ENTRY's kind at j - 5, its bits at j
            plan = [
                v | cuda_int4.PDL if j % t4.ENTRY == 6 and m.plan[j - 5] == t4.MMA else v
                for j, v in enumerate(m.plan)
            ]
            n += plan != m.plan
            m.plan = plan
    dec.fused_pdl = dense
    for layer in dec.model.layers:
        layer.attn_pdl, layer.fused_pdl = True, dense
        if getattr(layer, "mma_fused", None) is not None:
            layer.mma_fused = [[ksb, minb, bits | cuda_int4.PDL] for ksb, minb, bits in layer.mma_fused]
    return n


def use_device_sms(dec: Decoder, device) -> int | None:
    """The layers' paged decode attention planned for this GPU's streaming multiprocessors (`attn_sms`, read by
    attention.decode_plan in the compiled layer; without it the plan assumes the 132 of the H100 it was fitted on).
    A verify's rows and the one-token step read the same attribute, so they keep one plan. Returns the count
    (None off CUDA: the plan is then only that of the CPU tests, through Triton's interpreter)."""
    if torch.device(device).type != "cuda":
        return None
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    for layer in dec.model.layers:
        layer.attn_sms = sms
    return sms


def use_attn_last_merges(dec: Decoder, device, rows: int) -> None:
    """Option attn_last_merges: the layers' Triton paged decode attention as one kernel, whose last program of each
    (row, kv head) merges the context splits, instead of a second merge kernel (runtime/triton_attention.py). The
    layers run one after another, so they share one buffer of rows x kv heads int32 counters, which every launch
    leaves at 0; a call with more rows than that runs the two kernels."""
    counters = torch.zeros(rows * dec.model.layers[0].self_attn.n_kv, dtype=torch.int32, device=device)
    for layer in dec.model.layers:
        layer.attn_counters = counters


def decode_forward(
    dec: Decoder,
    tokens,
    positions,
    block_tables,
    seq_lens,
    slots,
    k_pools,
    v_pools,
    block_size: int,
    attention: str = "gather",
    layer_fn=paged_layer,
) -> torch.Tensor:
    """One decode step. tokens/positions/seq_lens/slots [B], block_tables [B, M] → logits fp32 [B, V]."""
    if attention == "flex":
        return _decode_flex(
            dec, tokens, positions, block_tables, seq_lens, slots, k_pools, v_pools, block_size
        )
    return extend_forward(
        dec,
        tokens[:, None],
        positions[:, None],
        block_tables,
        slots,
        k_pools,
        v_pools,
        block_size,
        layer_fn,
        attention,
    )[:, 0]


def _decode_flex(dec, tokens, positions, block_tables, seq_lens, slots, k_pools, v_pools, block_size):
    """The experimental FlexAttention decode (runtime/attention.py): eager tests only."""
    h = dec.embed(tokens[:, None])
    cos, sin = dec.rotary(positions[:, None], h.dtype)
    for i, layer in enumerate(dec.model.layers):

        def attend(q, k, v, i=i):
            write_kv(k_pools[i], slots, k)
            write_kv(v_pools[i], slots, v)
            return decode_flex(q, k_pools[i], v_pools[i], block_tables, seq_lens, block_size)

        h = _block(layer, h, cos, sin, attend)
    return dec.logits(h[:, 0]).float()


def triton_attention_fits(head_dim: int, block_size: int) -> bool:
    """The Triton paged kernel's tiles: a power-of-two head_dim >= 16, blocks of >= 16 tokens."""
    return head_dim >= 16 and not head_dim & (head_dim - 1) and block_size >= 16


def _own_copy(fn):
    """A new function object over fn's code: dynamo's compiled graphs and recompile count are per copy."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__)


class PagedModel(nn.Module):
    """prefill(ids, slots), forward(...) = one decode step, extend(...) = S tokens per row; over `cache`."""

    def __init__(self, dec: Decoder, cache: PagedKVCache, attention: str = "gather"):
        super().__init__()
        if attention == "flex" and dec.cfg.sliding_window is not None:
            raise InputError("attention='flex' does not implement a sliding window; use attention='gather'.")
        if attention == "triton":
            d, bs = dec.cfg.head_dim, cache.block_size
            if not triton_attention_fits(d, bs):
                raise InputError(
                    f"attention='triton' needs a power-of-two head_dim >= 16 (got {d}) and block_size >= 16 "
                    f"(got {bs}); use attention='gather'."
                )
            import lorafast_export.runtime.triton_attention  # noqa: F401  (registers torch.ops.lorafast)
        self.dec, self.attention, self.block_size = dec, attention, cache.block_size
        self.n_layers = len(cache.k)
        self.layer_fn, self.prefill_fn, self.chunk_fn = paged_layer, prefill_layer, chunk_layer
        self.pdl = (
            False  # inductor's programmatic dependent launch in the decode layers (option inductor_pdl)
        )
        for i, (k, v) in enumerate(zip(cache.k, cache.v, strict=True)):  # buffers: CUDA graphs may write them
            self.register_buffer(f"k_pool{i}", k, persistent=False)
            self.register_buffer(f"v_pool{i}", v, persistent=False)

    def compile_layers(self) -> None:
        """torch.compile the per-layer function: one graph for every layer (per shape), compiled in seconds
        where the whole 32-layer step took ~80 s per shape on an H200. Each model compiles its own copy of
        the function: dynamo keeps compiled graphs (and counts recompiles against its limit) per code
        object, and the graphs of other runtimes in the process (a draft, another artifact, another dtype)
        would otherwise use up that limit."""
        opts = {"triton.enable_pdl": True} if self.pdl else None  # only inside the whole-step CUDA graphs
        self.layer_fn = torch.compile(_own_copy(paged_layer), fullgraph=True, options=opts)

    def compile_prefill(self) -> None:
        """torch.compile the prefill layer, dynamic in the token count: one graph for every layer and
        prompt length (eager, the RMSNorms, rope and silu run as many unfused kernels over [T, hidden]); and
        the chunked prefill's layer the same way (dynamic in the chunk's length and its prefix)."""
        self.prefill_fn = torch.compile(_own_copy(prefill_layer), dynamic=True)
        self.chunk_fn = torch.compile(_own_copy(chunk_layer), dynamic=True)

    def pools(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        return (
            [getattr(self, f"k_pool{i}") for i in range(self.n_layers)],
            [getattr(self, f"v_pool{i}") for i in range(self.n_layers)],
        )

    @torch.no_grad()
    def prefill(
        self,
        ids: torch.Tensor,
        slots: torch.Tensor | None,
        last_only: bool = True,
        last_index=None,
        segments=None,
    ) -> torch.Tensor:
        return prefill_forward(
            self.dec, ids, slots, *self.pools(), last_only, last_index, segments, self.prefill_fn
        )

    @torch.no_grad()
    def chunk(self, ids: torch.Tensor, start: int, slots: torch.Tensor) -> torch.Tensor:
        """A later chunk of one prompt on top of its cached first `start` tokens (chunk_forward), through the
        compiled chunk layer where the prefill is compiled (compile_prefill); no CUDA graph: its length and
        position vary from chunk to chunk, and its products are large enough not to need one."""
        return chunk_forward(self.dec, ids, start, slots, *self.pools(), self.chunk_fn)

    @torch.no_grad()
    def extend(self, tokens, positions, block_tables, slots) -> torch.Tensor:
        return extend_forward(
            self.dec,
            tokens,
            positions,
            block_tables,
            slots,
            *self.pools(),
            self.block_size,
            self.layer_fn,
            self.attention if self.attention == "triton" else "gather",
        )

    @torch.no_grad()
    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        block_tables: torch.Tensor,
        seq_lens: torch.Tensor,
        slots: torch.Tensor,
    ) -> torch.Tensor:
        return decode_forward(
            self.dec,
            tokens,
            positions,
            block_tables,
            seq_lens,
            slots,
            *self.pools(),
            self.block_size,
            self.attention,
            self.layer_fn,
        )
