"""The decoder as one ONNX graph of onnxruntime's fused ops, built straight from our tensors.

    input_ids ─ Gather(embed) ─┬─ SimplifiedLayerNormalization ─ q/k/v ─ GroupQueryAttention(rotary) ─ o ─┐
                               └──────────── residual ──────────── SkipSimplifiedLayerNormalization ◀────┘
                                 ... gate/up ─ SiLU·up ─ down ─ SkipSimplifiedLayerNormalization (next layer)
    final SkipSimplifiedLayerNormalization ─ lm_head ─ logits

Inputs/outputs follow onnxruntime-genai's decoder convention: input_ids, attention_mask [b, total],
past_key_values.N.key/value [b, kv_heads, past, head_dim] → logits, present.N.key/value. A linear is a
MatMul on the transposed fp weight, a MatMulNBits holding a QTensor's codes (nbits.py), or, for W8A8
(act_quant), per-token int8 quantization + MatMulInteger (w8a8.py). q/k/v fuse into one linear (fuse.py)
when they are of one kind.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from onnx import TensorProto

from lorafast_export.errors import UnsupportedError
from lorafast_export.model.spec import EMBED, FINAL_NORM, ModelConfig, layer_prefix, rope_inv_freq
from lorafast_export.qform import QTensor, concat_biases, concat_qtensors, with_fields
from lorafast_export.targets.onnxruntime.graph import Graph
from lorafast_export.targets.onnxruntime.nbits import pack_matmulnbits
from lorafast_export.targets.onnxruntime.w8a8 import check_w8a8, int8_matmul, quantize_tokens

ONNX_DTYPES = {"float32": (TensorProto.FLOAT, np.float32), "float16": (TensorProto.FLOAT16, np.float16)}


class Weights(Protocol):
    """Where the graph's tensors come from: fp tensors by HF name, QTensors by module path."""

    def fp(self, name: str) -> torch.Tensor | None: ...

    def q(self, module: str) -> QTensor | None: ...


@dataclass(frozen=True)
class GraphSettings:
    dtype: str  # float32 | float16: activations, fp weights, KV cache
    accuracy_level: int  # MatMulNBits accuracy_level (0: as the activation dtype; 4: int8 activations)
    max_length: int  # rows of the rotary cos/sin caches = longest sequence the artifact runs
    fuse_qkv: bool = True  # q/k/v as one (MatMulNBits|MatMul) with packed GroupQueryAttention input


def build_decoder_graph(cfg: ModelConfig, weights: Weights, settings: GraphSettings, path: Path) -> dict:
    """Write model.onnx (+ model.onnx.data) for cfg from weights; return facts (op counts) for the manifest."""
    if cfg.head_dim % 16:
        raise UnsupportedError(
            f"head_dim={cfg.head_dim}: onnxruntime's GroupQueryAttention needs a head size that is a multiple "
            "of 16 (its CPU kernel rejects others at run time)."
        )
    b = _Builder(Graph(path), cfg, weights, settings)
    try:
        b.build()
    finally:
        b.g.data.close()  # also on errors (the half-written directory is the pipeline's to discard)
    b.g.save()
    return {"ops": dict(sorted(b.g.op_count.items())), "act_order_gathers": b.n_gathers}


class _Builder:
    def __init__(self, g: Graph, cfg: ModelConfig, weights: Weights, settings: GraphSettings):
        self.g, self.cfg, self.w, self.s = g, cfg, weights, settings
        self.T, self.np_dtype = ONNX_DTYPES[settings.dtype]
        self.n_gathers = 0
        self._gathered: dict[tuple[str, bytes], str] = {}  # (input, perm) → gathered input, shared by gate/up
        self._act_q: dict[str, tuple[str, str]] = {}  # input → its int8 per-token quantization (W8A8)

    def build(self) -> None:
        cfg, g = self.cfg, self.g
        ids = g.add_input("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"])
        mask = g.add_input("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"])
        seqlens_k, total_len = self.mask_lengths(mask)
        cos, sin = self.rotary_caches()
        h = g.op1("Gather", [g.init(EMBED, self.fp_array(EMBED)), ids], "/model/embed_tokens/Gather")
        residual, mlp_out = h, None
        for i in range(cfg.num_layers):
            p = layer_prefix(i)
            x, residual = self.norm(
                residual, mlp_out, f"{p}input_layernorm.weight", f"/model/layers.{i}/input_norm"
            )
            attn = self.attention(i, x, seqlens_k, total_len, cos, sin)
            x, residual = self.norm(
                residual,
                attn,
                f"{p}post_attention_layernorm.weight",
                f"/model/layers.{i}/post_attention_norm",
            )
            mlp_out = self.mlp(i, x)
        x, _ = self.norm(residual, mlp_out, FINAL_NORM, "/model/norm")
        logits = self.linear(x, "lm_head", "/lm_head")
        if self.T != TensorProto.FLOAT:
            logits = g.op1("Cast", [logits], "/lm_head/Cast", to=TensorProto.FLOAT)
        g.op("Identity", [logits], "/logits", outputs=["logits"])
        g.add_output("logits", TensorProto.FLOAT, ["batch_size", "sequence_length", cfg.vocab_size])

    # ------------------------------------------------------------------------------------ pieces

    def mask_lengths(self, mask: str) -> tuple[str, str]:
        """attention_mask [b, total] → seqlens_k int32 [b] (= real tokens - 1), total_sequence_length int32."""
        g, n = self.g, "/model/attn_mask"
        real = g.op1("ReduceSum", [mask, g.const([1])], f"{n}/ReduceSum", keepdims=0)
        seqlens = g.op1(
            "Cast", [g.op1("Sub", [real, g.const(1)], f"{n}/Sub")], f"{n}/seqlens_k", to=TensorProto.INT32
        )
        total = g.op1("Gather", [g.op1("Shape", [mask], f"{n}/Shape"), g.const(1)], f"{n}/Gather", axis=0)
        return seqlens, g.op1("Cast", [total], f"{n}/total_seq_len", to=TensorProto.INT32)

    def rotary_caches(self) -> tuple[str, str]:
        """cos/sin [max_length, head_dim/2], computed like model.decoder.Rotary (rope variant included)."""
        inv_freq, scale = rope_inv_freq(self.cfg)
        freqs = torch.arange(self.s.max_length, dtype=torch.float32)[:, None] * inv_freq[None]  # [L, d/2]
        cos = (freqs.cos() * scale).numpy().astype(self.np_dtype)
        sin = (freqs.sin() * scale).numpy().astype(self.np_dtype)
        return self.g.init("cos_cache", cos), self.g.init("sin_cache", sin)

    def norm(self, residual: str, delta: str | None, weight: str, name: str) -> tuple[str, str]:
        """RMSNorm(residual + delta) and the new residual; the first norm of the model has no delta."""
        w = self.g.init(weight, self.fp_array(weight))
        eps = self.cfg.rms_norm_eps
        if delta is None:
            return self.g.op1(
                "SimplifiedLayerNormalization", [residual, w], name, axis=-1, epsilon=eps, stash_type=1
            ), residual
        outs = [f"{name}/output_0", "", "", f"{name}/output_3"]
        self.g.op(
            "SkipSimplifiedLayerNormalization",
            [residual, delta, w],
            name,
            domain="com.microsoft",
            outputs=outs,
            epsilon=eps,
        )
        return outs[0], outs[3]

    def attention(self, i: int, x: str, seqlens_k: str, total_len: str, cos: str, sin: str) -> str:
        cfg, g, p, n = self.cfg, self.g, f"{layer_prefix(i)}self_attn.", f"/model/layers.{i}/attn"
        qkv = self.packed_qkv(x, p, n) if self.s.fuse_qkv else None
        if qkv is None:
            qkv = [self.linear(x, p + proj, f"{n}/{proj}") for proj in ("q_proj", "k_proj", "v_proj")]
        else:
            qkv = [qkv, "", ""]  # GroupQueryAttention splits a packed [b, s, (heads + 2 kv_heads) * head_dim]
        past = [
            g.add_input(
                f"past_key_values.{i}.{kv}",
                self.T,
                ["batch_size", cfg.num_kv_heads, "past_sequence_length", cfg.head_dim],
            )
            for kv in ("key", "value")
        ]
        present = [f"present.{i}.key", f"present.{i}.value"]
        window = cfg.sliding_window if cfg.sliding_window and cfg.sliding_window < self.s.max_length else -1
        out = g.op(
            "GroupQueryAttention",
            [*qkv, *past, seqlens_k, total_len, cos, sin],
            f"{n}/GQA",
            domain="com.microsoft",
            outputs=[f"{n}/GQA/output_0", *present],
            num_heads=cfg.num_heads,
            kv_num_heads=cfg.num_kv_heads,
            do_rotary=1,
            rotary_interleaved=0,
            local_window_size=window,
        )[0]
        for name in present:
            g.add_output(
                name, self.T, ["batch_size", cfg.num_kv_heads, "total_sequence_length", cfg.head_dim]
            )
        return self.linear(out, p + "o_proj", f"{n}/o_proj")

    def packed_qkv(self, x: str, p: str, n: str) -> str | None:
        """q/k/v as one linear (rows concatenated: the same codes, one kernel), or None if they differ in kind."""
        modules = [p + proj for proj in ("q_proj", "k_proj", "v_proj")]
        qts = [self.w.q(m) for m in modules]
        biases = [self.w.fp(f"{m}.bias") for m in modules]
        if all(qt is None for qt in qts):
            w = torch.cat([self.fp_weight(m) for m in modules])
            sizes = [self.cfg.num_heads * self.cfg.head_dim] + [self.cfg.num_kv_heads * self.cfg.head_dim] * 2
            return self.fp_linear(x, p + "qkv_proj", w, concat_biases(biases, sizes), f"{n}/qkv_proj")
        if any(qt is None for qt in qts):
            return None
        fused = concat_qtensors(qts, biases)
        return None if fused is None else self.q_linear(x, p + "qkv_proj", fused, f"{n}/qkv_proj")

    def mlp(self, i: int, x: str) -> str:
        p, n, g = f"{layer_prefix(i)}mlp.", f"/model/layers.{i}/mlp", self.g
        gate = self.linear(x, p + "gate_proj", f"{n}/gate_proj")
        up = self.linear(x, p + "up_proj", f"{n}/up_proj")
        act = g.op1("Mul", [gate, g.op1("Sigmoid", [gate], f"{n}/act/Sigmoid")], f"{n}/act/Mul")
        return self.linear(g.op1("Mul", [act, up], f"{n}/Mul"), p + "down_proj", f"{n}/down_proj")

    # ----------------------------------------------------------------------------------- linears

    def linear(self, x: str, module: str, name: str) -> str:
        qt = self.w.q(module)
        if qt is None:
            return self.fp_linear(x, module, self.fp_weight(module), self.w.fp(f"{module}.bias"), name)
        if qt.bias is None and self.w.fp(f"{module}.bias") is not None:
            qt = with_fields(qt, bias=self.w.fp(f"{module}.bias"))
        return self.q_linear(x, module, qt, name)

    def q_linear(self, x: str, module: str, qt: QTensor, name: str) -> str:
        y = self.int8_linear(x, module, qt, name) if qt.act_quant else self.nbits_linear(x, module, qt, name)
        return self.add_bias(y, module, qt.bias, name)

    def fp_linear(self, x: str, module: str, w: torch.Tensor, bias: torch.Tensor | None, name: str) -> str:
        wt = self.g.init(f"{module}.weight.T", w.float().numpy().T.astype(self.np_dtype))  # [in, out]
        return self.add_bias(self.g.op1("MatMul", [x, wt], f"{name}/MatMul"), module, bias, name)

    def add_bias(self, y: str, module: str, bias: torch.Tensor | None, name: str) -> str:
        if bias is None:
            return y
        b = self.g.init(f"{module}.bias", bias.float().numpy().astype(self.np_dtype))
        return self.g.op1("Add", [y, b], f"{name}/BiasAdd")

    def fp_weight(self, module: str) -> torch.Tensor:
        w = self.w.fp(f"{module}.weight")
        if w is None and module == "lm_head" and self.cfg.tie_word_embeddings:
            w = self.w.fp(EMBED)  # tied: a transposed copy, since MatMul cannot read the table transposed
        if w is None:
            raise UnsupportedError(f"tensor {module}.weight is missing from the model being lowered.")
        return w

    def nbits_linear(self, x: str, module: str, qt: QTensor, name: str) -> str:
        nb = pack_matmulnbits(qt, self.np_dtype, where=module)
        g = self.g
        if nb.perm is not None:
            x = self.gather_columns(x, module, nb.perm, name)
        inputs = [x, g.init(f"{module}.qweight", nb.B), g.init(f"{module}.scales", nb.scales)]
        if nb.zero_points is not None:
            inputs.append(g.init(f"{module}.qzeros", nb.zero_points))
        return g.op1(
            "MatMulNBits",
            inputs,
            f"{name}/MatMulNBits",
            domain="com.microsoft",
            K=nb.K,
            N=nb.N,
            bits=nb.bits,
            block_size=nb.block_size,
            accuracy_level=self.s.accuracy_level,
        )

    def gather_columns(self, x: str, module: str, perm: np.ndarray, name: str) -> str:
        key = (x, perm.tobytes())
        if key not in self._gathered:
            idx = self.g.init(f"{module}.act_order_perm", perm)
            self._gathered[key] = self.g.op1("Gather", [x, idx], f"{name}/ActOrderGather", axis=-1)
            self.n_gathers += 1
        return self._gathered[key]

    def int8_linear(self, x: str, module: str, qt: QTensor, name: str) -> str:
        """W8A8 (ort/w8a8.py); linears reading the same input share one activation quantization."""
        check_w8a8(qt, module)
        g = self.g
        if x not in self._act_q:
            xf = (
                g.op1("Cast", [x], f"{name}/CastIn", to=TensorProto.FLOAT)
                if self.T != TensorProto.FLOAT
                else x
            )
            self._act_q[x] = quantize_tokens(g, xf, f"{name}/QuantizeTokens")
        y = int8_matmul(g, *self._act_q[x], module, qt, f"{name}/W8A8")
        return g.op1("Cast", [y], f"{name}/CastOut", to=self.T) if self.T != TensorProto.FLOAT else y

    def fp_array(self, name: str) -> np.ndarray:
        t = self.w.fp(name)
        if t is None:
            raise UnsupportedError(f"tensor {name} is missing from the model being lowered.")
        return t.float().numpy().astype(self.np_dtype)
