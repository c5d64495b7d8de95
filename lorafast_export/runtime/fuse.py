"""Projections that read the same input fused into one matmul at load: q/k/v → qkv_proj, gate/up → gate_up_proj.

One [sum out, in] weight instead of two or three: fewer launches, and the small k/v matmuls (1024 x 4096 on a
Llama-3-8B) no longer run far below the memory bandwidth on their own. Concatenating along the output
dimension keeps every weight, code, scale and zero point as it is, so the fused linear computes exactly the
parts side by side. Quantized parts fuse only when they share one scheme (and one act-order permutation);
otherwise they stay separate, which is always correct.
"""

from __future__ import annotations

import torch
from torch import nn

from lorafast_export.qform import QTensor

GROUPS = (
    ("self_attn", ("q_proj", "k_proj", "v_proj"), "qkv_proj"),
    ("mlp", ("gate_proj", "up_proj"), "gate_up_proj"),
)


def fusion_groups(n_layers: int) -> list[tuple[str, list[str], str]]:
    """(parent module path, part paths, fused attribute name) for every layer."""
    out = []
    for i in range(n_layers):
        for parent, parts, fused in GROUPS:
            p = f"model.layers.{i}.{parent}"
            out.append((p, [f"{p}.{n}" for n in parts], fused))
    return out


def concat_biases(biases: list[torch.Tensor | None], sizes: list[int]) -> torch.Tensor | None:
    """Biases of the parts (None = zeros) → one bias, or None when no part has one."""
    if all(b is None for b in biases):
        return None
    return torch.cat(
        [torch.zeros(n) if b is None else b.float().cpu() for b, n in zip(biases, sizes, strict=True)]
    )


def concat_qtensors(qts: list[QTensor], biases: list[torch.Tensor | None]) -> QTensor | None:
    """QTensors [out_i, in] of one scheme → one [sum out_i, in]; None if schemes or act-order differ.
    `biases`: each part's bias held outside its QTensor (HF `*.bias` tensors), folded into the fused one."""
    a = qts[0]
    same = all(q.scheme == a.scheme and q.in_features == a.in_features for q in qts) and all(
        (q.g_idx is None and a.g_idx is None)
        or (q.g_idx is not None and a.g_idx is not None and torch.equal(q.g_idx, a.g_idx))
        for q in qts
    )
    if not same:
        return None
    scales = [q.scales for q in qts]
    if any(s.dtype != scales[0].dtype for s in scales):
        scales = [s.float() for s in scales]  # fp16/bf16 → fp32 is exact
    sizes = [q.out_features for q in qts]
    parts = [q.bias if q.bias is not None else b for q, b in zip(qts, biases, strict=True)]
    return QTensor(
        codes=torch.cat([q.codes for q in qts]),
        scales=torch.cat(scales),
        zeros=None if a.zeros is None else torch.cat([q.zeros for q in qts]),
        bits=a.bits,
        group_size=a.group_size,
        g_idx=a.g_idx,
        bias=concat_biases(parts, sizes),
        act_quant=a.act_quant,
    )


def fused_dense(parts: list[nn.Linear]) -> nn.Linear:
    """Plain linears → one nn.Linear over the concatenated weights (the parts' memory is released)."""
    w = torch.cat([p.weight.detach() for p in parts])
    bias = concat_biases([p.bias for p in parts], [p.out_features for p in parts])
    with torch.device("meta"):
        lin = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None)
    lin.weight = nn.Parameter(w, requires_grad=False)
    if bias is not None:
        lin.bias = nn.Parameter(bias.to(device=w.device, dtype=w.dtype), requires_grad=False)
    return lin
