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

from lorafast_export.qform import concat_biases

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
