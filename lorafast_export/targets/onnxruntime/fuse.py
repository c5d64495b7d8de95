"""Row-concatenation of linears that read the same input (q/k/v): one kernel instead of three.

Concatenating along the output dimension keeps every code, scale and zero point as it is: the fused
linear computes exactly the three outputs side by side.
"""

from __future__ import annotations

import torch

from lorafast_export.qform import QTensor


def concat_biases(biases: list[torch.Tensor | None], sizes: list[int]) -> torch.Tensor | None:
    """Biases of the parts (None = no bias, i.e. zeros) → one bias, or None when no part has one."""
    if all(b is None for b in biases):
        return None
    return torch.cat([torch.zeros(n) if b is None else b.float() for b, n in zip(biases, sizes)])


def concat_qtensors(qts: list[QTensor]) -> QTensor | None:
    """QTensors [out_i, in] of one scheme → one QTensor [sum out_i, in]; None if their schemes differ."""
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
    return QTensor(
        codes=torch.cat([q.codes for q in qts]),
        scales=torch.cat(scales),
        zeros=None if a.zeros is None else torch.cat([q.zeros for q in qts]),
        bits=a.bits,
        group_size=a.group_size,
        g_idx=a.g_idx,
        bias=concat_biases([q.bias for q in qts], [q.out_features for q in qts]),
        act_quant=a.act_quant,
    )
