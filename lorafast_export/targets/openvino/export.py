"""Trace the canonical decoder into an OpenVINO model with the I/O openvino-genai expects, then make it stateful.

Inputs  input_ids [b, s] i64, attention_mask [b, past+s] i64, position_ids [b, s] i64, beam_idx [b] i32;
output  logits [b, s, V] f32; the KV cache lives in ReadValue/Assign pairs (one per past_key_values.N.key/value).
That is the contract of optimum-intel's stateful decoders, which LLMPipeline runs as is and which
ContinuousBatchingPipeline rewrites into PagedAttention (its pattern: ReadValue → Gather(beam_idx) → Concat →
[Unsqueeze → Broadcast → Reshape for GQA] → ScaledDotProductAttention). So GQA heads are repeated with
expand + reshape here, not with repeat_interleave (which traces into Tile, a form that pattern does not know).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lorafast_export.model.decoder import Attention, Decoder, causal_mask
from lorafast_export.qform import QTensor, act_order_perm, dequantize, fake_quant_int8_per_token
from lorafast_export.targets.openvino.compress import padded_columns

KV_IN = "past_key_values.{i}.{kind}"
KV_OUT = "present.{i}.{kind}"
MAIN_INPUTS = ("input_ids", "attention_mask", "position_ids")


class ExportLinear(nn.Module):
    """A quantized linear as traced: f32 weight (dequantized, columns sorted by group under act-order, padded).

    The weight Constant is swapped for the compressed codes after conversion (compress.py); tracing it as
    fp first keeps the traced graph correct on its own. `perm` gathers the activations to match the sorted
    columns; `act_quant` applies the same per-token int8 fake-quantization as qform.QLinear.
    """

    def __init__(self, qt: QTensor):
        super().__init__()
        perm = act_order_perm(qt) if qt.g_idx is not None and qt.n_groups > 1 else None
        if perm is not None and torch.equal(perm, torch.arange(qt.in_features)):
            perm = None
        w = dequantize(qt)  # [out, in] f32
        w = w if perm is None else w[:, perm]
        self.pad = padded_columns(qt)  # zero columns so a ragged last group fills up (compress.py)
        self.weight = nn.Parameter(F.pad(w, (0, self.pad)), requires_grad=False)
        self.bias = None if qt.bias is None else nn.Parameter(qt.bias.float(), requires_grad=False)
        self.register_buffer("perm", perm)
        self.act_quant = qt.act_quant is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_quant:
            x = fake_quant_int8_per_token(x)
        if self.perm is not None:
            x = x.index_select(-1, self.perm)
        if self.pad:
            x = F.pad(x, (0, self.pad))
        return F.linear(x, self.weight, self.bias)


def _attention(attn: Attention, x, cos, sin, mask, past_k, past_v):
    b, s, _ = x.shape
    q = attn.q_proj(x).view(b, s, attn.n_heads, attn.head_dim).transpose(1, 2)  # [b, h, s, d]
    k = attn.k_proj(x).view(b, s, attn.n_kv, attn.head_dim).transpose(1, 2)  # [b, kv, s, d]
    v = attn.v_proj(x).view(b, s, attn.n_kv, attn.head_dim).transpose(1, 2)
    cos, sin = cos[:, None], sin[:, None]
    q = q * cos + _rotate_half(q) * sin
    k = torch.cat([past_k, k * cos + _rotate_half(k) * sin], dim=2)  # [b, kv, t, d]
    v = torch.cat([past_v, v], dim=2)
    rep = attn.n_heads // attn.n_kv
    kr, vr = (_repeat_kv(k, rep), _repeat_kv(v, rep)) if rep > 1 else (k, v)  # [b, h, t, d]
    out = F.scaled_dot_product_attention(q, kr, vr, attn_mask=mask)  # [b, h, s, d]
    return attn.o_proj(out.transpose(1, 2).reshape(b, s, -1)), k, v


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    """decoder.rotate_half as the CPU plugin's RoPE fusion wants it: slices (chunk traces into a VariadicSplit form
    it misses) and a multiply by -1 (neg traces into ConvertLike, which only folds away when the IR is saved)."""
    half = x.shape[-1] // 2
    return torch.cat((x[..., half:] * -1.0, x[..., :half]), dim=-1)


def _repeat_kv(x: torch.Tensor, rep: int) -> torch.Tensor:
    """[b, kv, t, d] → [b, kv*rep, t, d], head j*rep + r = kv head j (what repeat_interleave gives)."""
    b, kv, t, d = x.shape
    return x[:, :, None].expand(b, kv, rep, t, d).reshape(b, kv * rep, t, d)


class ExportDecoder(nn.Module):
    """forward(input_ids, attention_mask, position_ids, *past) → (logits, *present); past/present flat k, v per layer."""

    def __init__(self, dec: Decoder):
        super().__init__()
        self.dec = dec

    def forward(self, input_ids, attention_mask, position_ids, *past):
        dec = self.dec
        s, past_len = input_ids.shape[1], past[0].shape[2]
        h = dec.embed(input_ids)
        cos, sin = dec.rotary(position_ids, h.dtype)
        mask = causal_mask(s, past_len, input_ids.device, dec.cfg.sliding_window, attention_mask)
        present = []
        for i, layer in enumerate(dec.model.layers):
            a, k, v = _attention(
                layer.self_attn, layer.input_layernorm(h), cos, sin, mask, past[2 * i], past[2 * i + 1]
            )
            h = h + a
            h = h + layer.mlp(layer.post_attention_layernorm(h))
            present += [k, v]
        return (dec.logits(h), *present)


def weight_constant_name(path: str) -> str:
    """Friendly name openvino's torch frontend gives the weight Constant of module `path` inside ExportDecoder."""
    return f"self.dec.{path}.weight"


def example_inputs(dec: Decoder, batch: int = 2, seq: int = 3, past: int = 4) -> tuple[torch.Tensor, ...]:
    cfg = dec.cfg
    ids = torch.randint(0, cfg.vocab_size, (batch, seq))
    mask = torch.ones(batch, past + seq, dtype=torch.long)
    pos = torch.arange(past, past + seq)[None].expand(batch, seq).contiguous()
    kv = tuple(
        torch.randn(batch, cfg.num_kv_heads, past, cfg.head_dim) for _ in range(2 * len(dec.model.layers))
    )
    return (ids, mask, pos, *kv)


def convert(dec: Decoder):
    """Decoder → stateless ov.Model with named inputs/outputs (see module docstring)."""
    import openvino as ov
    from openvino.frontend.pytorch.ts_decoder import TorchScriptPythonDecoder

    example = example_inputs(dec)
    with torch.no_grad():  # check_trace off: it re-runs the model twice and compares, doubling the time
        traced = TorchScriptPythonDecoder(
            ExportDecoder(dec).eval(), example_input=example, trace_kwargs={"check_trace": False}
        )
        om = ov.convert_model(traced, example_input=example)
    n_layers = len(dec.model.layers)
    kv_in = [KV_IN.format(i=i, kind=k) for i in range(n_layers) for k in ("key", "value")]
    kv_out = [KV_OUT.format(i=i, kind=k) for i in range(n_layers) for k in ("key", "value")]
    for port, name in zip(om.inputs, (*MAIN_INPUTS, *kv_in), strict=True):
        port.get_tensor().set_names({name})
    for port, name in zip(om.outputs, ("logits", *kv_out), strict=True):
        port.get_tensor().set_names({name})
    return om


def make_stateful(om) -> None:
    """Hide the KV inputs/outputs in ReadValue/Assign variables, gathered by a new beam_idx input each step."""
    import openvino as ov
    from openvino import opset13 as ops
    from openvino._offline_transformations import apply_make_stateful_transformation

    kv_in = [p.get_any_name() for p in om.inputs if p.get_any_name().startswith("past_key_values.")]
    batch = om.input("input_ids").get_partial_shape()[0]
    beam_idx = ops.parameter(ov.PartialShape([batch]), ov.Type.i32, name="beam_idx")
    beam_idx.output(0).get_tensor().set_names({"beam_idx"})
    om.add_parameters([beam_idx])
    for name in kv_in:  # reorder the cache by beam_idx (identity for greedy / plain batches)
        port = om.input(name)
        consumers = port.get_target_inputs()
        gathered = ops.gather(port, beam_idx, ops.constant(0))
        for c in consumers:
            c.replace_source_output(gathered.output(0))
    om.validate_nodes_and_infer_types()
    apply_make_stateful_transformation(om, {n: n.replace("past_key_values", "present") for n in kv_in})
    _zero_initial_state(om)


def _zero_initial_state(om) -> None:
    """Each ReadValue starts as zeros [batch, kv_heads, 0, head_dim], batch taken from input_ids."""
    from openvino import opset13 as ops

    ids_shape = ops.shape_of(om.input("input_ids"), output_type="i64")
    batch = ops.gather(ids_shape, ops.constant([0]), ops.constant(0))
    for node in om.get_ops():
        if node.get_type_name() != "ReadValue":
            continue
        dims = [
            ops.constant(np.array([d.get_length() if d.is_static else 0], dtype=np.int64))
            for d in node.get_output_partial_shape(0)
        ]
        dims[0] = batch
        zeros = ops.broadcast(
            ops.constant(0.0, dtype=node.get_output_element_type(0)), ops.concat(dims, axis=0)
        )
        node.set_arguments([zeros])
    om.validate_nodes_and_infer_types()
