"""The canonical decoder's weights run over the paged KV cache: prefill (SDPA) and one decode step.

`build_model` assembles a Decoder from fp tensors (HF names) plus QTensors lowered to runtime linears.
`PagedModel` reuses the decoder's modules (norms, projections, MLP, rotary) and replaces only attention.
Its `forward` is the decode step that the engine compiles; the pools are registered buffers so that
CUDA graphs may write them in place.
"""

from __future__ import annotations

import torch
from torch import nn

from lorafast_export.errors import InputError
from lorafast_export.model.decoder import Decoder, Rotary
from lorafast_export.model.spec import LM_HEAD, ModelConfig
from lorafast_export.runtime.attention import (
    decode_flex,
    decode_gather,
    prefill_attention,
    project_qkv,
    write_kv,
)
from lorafast_export.runtime.kv_cache import PagedKVCache
from lorafast_export.runtime.linear import lower_qtensor


def _set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def build_model(
    cfg: ModelConfig,
    fp: dict[str, torch.Tensor],
    q: dict | None,
    device,
    dtype: torch.dtype,
    kernel: str = "auto",
    source: str = "model",
) -> tuple[Decoder, dict[str, str]]:
    """Decoder on `device` in `dtype`: fp tensors by HF name, QTensors (module path → QTensor) lowered to
    runtime linears. Returns (decoder, {module path: kernel}). Missing or unexpected tensors are an error."""
    q = q or {}
    with torch.device("meta"):
        dec = Decoder(cfg)
    fp = dict(fp)
    if cfg.tie_word_embeddings:
        fp.pop(LM_HEAD, None)
    kernels = {}
    for path, qt in q.items():
        mod = lower_qtensor(qt, device, dtype, kernel, bias=fp.pop(f"{path}.bias", None))
        _set_module(dec, path, mod)
        kernels[path] = mod.kernel
    state = {k: v.to(device=device, dtype=dtype) for k, v in fp.items()}
    res = dec.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in res.missing_keys if not any(k.startswith(p + ".") for p in q)]
    if missing or res.unexpected_keys:
        raise InputError(
            f"{source}: tensors do not match a {cfg.family} model: missing {missing[:8]}, "
            f"unexpected {res.unexpected_keys[:8]}. Re-export the artifact."
        )
    dec.rotary = Rotary(cfg).to(device)
    return dec.eval(), kernels


def _layers(dec: Decoder, h, cos, sin, attend):
    for i, layer in enumerate(dec.model.layers):
        b, s, _ = h.shape
        q, k, v = project_qkv(layer.self_attn, layer.input_layernorm(h), cos, sin)
        a = attend(i, q, k, v)  # [b, hq, s, d]
        h = h + layer.self_attn.o_proj(a.transpose(1, 2).reshape(b, s, -1))
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    return h


def prefill_forward(dec: Decoder, ids, slots, k_pools, v_pools, last_only: bool = True) -> torch.Tensor:
    """ids [b, s] from position 0 → logits fp32 [b, V] (last position) or [b, s, V]; writes k/v of every
    position at slots [b*s] of the per-layer pools (lists of [hkv, S, d]) unless slots is None."""
    h = dec.embed(ids)
    pos = torch.arange(ids.shape[1], device=ids.device)[None].expand_as(ids)
    cos, sin = dec.rotary(pos, h.dtype)

    def attend(i, q, k, v):
        if slots is not None:
            write_kv(k_pools[i], slots, k)
            write_kv(v_pools[i], slots, v)
        return prefill_attention(q, k, v, dec.cfg.sliding_window)

    h = _layers(dec, h, cos, sin, attend)
    return dec.logits(h[:, -1] if last_only else h).float()


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
) -> torch.Tensor:
    """One decode step. tokens/positions/seq_lens/slots [B], block_tables [B, M] → logits fp32 [B, V]."""
    h = dec.embed(tokens[:, None])  # [B, 1, hidden]
    cos, sin = dec.rotary(positions[:, None], h.dtype)

    def attend(i, q, k, v):
        write_kv(k_pools[i], slots, k)
        write_kv(v_pools[i], slots, v)
        if attention == "flex":
            return decode_flex(q, k_pools[i], v_pools[i], block_tables, seq_lens, block_size)
        return decode_gather(
            q, k_pools[i], v_pools[i], block_tables, seq_lens, block_size, dec.cfg.sliding_window
        )

    h = _layers(dec, h, cos, sin, attend)
    return dec.logits(h[:, 0]).float()


class PagedModel(nn.Module):
    """prefill(ids, slots) and forward(...) = one decode step, both over `cache`'s pools."""

    def __init__(self, dec: Decoder, cache: PagedKVCache, attention: str = "gather"):
        super().__init__()
        if attention == "flex" and dec.cfg.sliding_window is not None:
            raise InputError("attention='flex' does not implement a sliding window; use attention='gather'.")
        self.dec, self.attention, self.block_size = dec, attention, cache.block_size
        self.n_layers = len(cache.k)
        for i, (k, v) in enumerate(zip(cache.k, cache.v, strict=True)):  # buffers: CUDA graphs may write them
            self.register_buffer(f"k_pool{i}", k, persistent=False)
            self.register_buffer(f"v_pool{i}", v, persistent=False)

    def pools(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        return (
            [getattr(self, f"k_pool{i}") for i in range(self.n_layers)],
            [getattr(self, f"v_pool{i}") for i in range(self.n_layers)],
        )

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor, slots: torch.Tensor | None, last_only: bool = True) -> torch.Tensor:
        return prefill_forward(self.dec, ids, slots, *self.pools(), last_only)

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
        )
