"""The canonical decoder: one small, export-friendly module for every supported family.

Its parameter names are the Hugging Face checkpoint names (model.layers.N.self_attn.q_proj.weight, ...), so a
state dict moves between a checkpoint and this module unchanged. The KV cache is explicit: a list of (k, v)
tensors [batch, kv_heads, past, head_dim] goes in and the grown list comes out, which is what ONNX/OpenVINO
exporters and our own runtime need. Linear layers may be swapped for qform.QLinear (fake-quant) modules.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorafast_export.model.spec import ATTN_PROJ, MLP_PROJ, ModelConfig, rope_inv_freq

KV = tuple[torch.Tensor, torch.Tensor]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Rotary(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        inv, self.scale = rope_inv_freq(cfg)
        self.register_buffer("inv_freq", inv, persistent=False)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq  # [b, s, d/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [b, s, d]
        return (emb.cos() * self.scale).to(dtype), (emb.sin() * self.scale).to(dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h, kv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.n_heads, self.n_kv, self.head_dim = h, kv, d
        self.q_proj = nn.Linear(cfg.hidden_size, h * d, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, kv * d, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, kv * d, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(h * d, cfg.hidden_size, bias=cfg.o_bias)

    def forward(self, x, cos, sin, mask, past: KV | None, is_causal: bool = False) -> tuple[torch.Tensor, KV]:
        """is_causal: plain causal attention through SDPA's own causal kernels (flash on CUDA) instead of
        `mask`, which must then be None; only without a cache and without a sliding window inside x."""
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.n_heads, self.head_dim).transpose(1, 2)  # [b, h, s, d]
        k = self.k_proj(x).view(b, s, self.n_kv, self.head_dim).transpose(1, 2)  # [b, kv, s, d]
        v = self.v_proj(x).view(b, s, self.n_kv, self.head_dim).transpose(1, 2)
        cos, sin = cos[:, None], sin[:, None]  # [b, 1, s, d]
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if past is not None:
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        rep = self.n_heads // self.n_kv
        kr = k.repeat_interleave(rep, dim=1) if rep > 1 else k  # [b, h, t, d]
        vr = v.repeat_interleave(rep, dim=1) if rep > 1 else v
        if is_causal and (mask is not None or past is not None):
            raise ValueError(
                "Attention: is_causal=True takes no mask and no past (it is the prefill's own mask)"
            )
        out = F.scaled_dot_product_attention(q, kr, vr, attn_mask=mask, is_causal=is_causal)  # [b, h, s, d]
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1)), (k, v)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(
        self, x, cos, sin, mask, past: KV | None = None, is_causal: bool = False
    ) -> tuple[torch.Tensor, KV]:
        a, present = self.self_attn(self.input_layernorm(x), cos, sin, mask, past, is_causal)
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x)), present

    def linears(self) -> dict[str, nn.Module]:
        """Relative names (self_attn.q_proj, ...) → linear modules, in execution order."""
        out = {f"self_attn.{n}": getattr(self.self_attn, n) for n in ATTN_PROJ}
        out.update({f"mlp.{n}": getattr(self.mlp, n) for n in MLP_PROJ})
        return out


class _Body(nn.Module):
    def __init__(self, cfg: ModelConfig, n_layers: int):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(n_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


def causal_mask(
    q_len: int, past_len: int, device, window: int | None = None, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Boolean mask [b|1, 1, q, past+q]: True where a query may attend to a key."""
    q_pos = torch.arange(q_len, device=device)[:, None] + past_len  # [q, 1]
    k_pos = torch.arange(past_len + q_len, device=device)[None, :]  # [1, t]
    allowed = k_pos <= q_pos
    if window is not None:
        allowed = allowed & (q_pos - k_pos < window)
    allowed = allowed[None, None]  # [1, 1, q, t]
    if attention_mask is not None:  # [b, t] padding mask (1 = real token)
        allowed = allowed & attention_mask[:, None, None, :].bool()
    return allowed


class Decoder(nn.Module):
    """Causal LM. forward(input_ids [b, s], past, position_ids, attention_mask) → (logits [b, s, V], present)."""

    def __init__(self, cfg: ModelConfig, n_layers: int | None = None):
        super().__init__()
        self.cfg = cfg
        self.model = _Body(cfg, cfg.num_layers if n_layers is None else n_layers)
        self.rotary = Rotary(cfg)
        self.lm_head = (
            None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        )

    def head_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.head(self.model.norm(h))

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """The lm_head (the embeddings when tied) of rows already normalized."""
        return self.lm_head(h) if self.lm_head is not None else F.linear(h, self.model.embed_tokens.weight)

    def rope_and_mask(self, input_ids, past_len: int, position_ids=None, attention_mask=None, dtype=None):
        b, s = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(past_len, past_len + s, device=input_ids.device)[None].expand(b, s)
        cos, sin = self.rotary(position_ids, dtype or self.model.embed_tokens.weight.dtype)
        mask = causal_mask(s, past_len, input_ids.device, self.cfg.sliding_window, attention_mask)
        return cos, sin, mask

    def forward(
        self, input_ids: torch.Tensor, past: list[KV] | None = None, position_ids=None, attention_mask=None
    ) -> tuple[torch.Tensor, list[KV]]:
        past_len = 0 if not past else past[0][0].shape[2]
        h = self.embed(input_ids)
        cos, sin, mask = self.rope_and_mask(input_ids, past_len, position_ids, attention_mask, h.dtype)
        present = []
        for i, layer in enumerate(self.model.layers):
            h, kv = layer(h, cos, sin, mask, past[i] if past else None)
            present.append(kv)
        return self.logits(h), present


def build_decoder(
    cfg: ModelConfig, state: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32
) -> Decoder:
    """A Decoder holding `state` (HF names), cast to dtype. Missing or unexpected tensors are an error."""
    with torch.device("meta"):
        dec = Decoder(cfg)
    state = {k: v for k, v in state.items() if not (cfg.tie_word_embeddings and k == "lm_head.weight")}
    dec.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    dec.rotary = Rotary(cfg)
    return dec.eval()


def load_decoder(model_dir, dtype: torch.dtype = torch.float32) -> Decoder:
    """Load a whole checkpoint (a ModelDir from lorafast_export.weights) into the canonical decoder."""
    names = [k for k in model_dir.store.keys() if not k.endswith("rotary_emb.inv_freq")]
    return build_decoder(model_dir.config, {k: model_dir.store.get(k) for k in names}, dtype)
