"""QuantizedModel: the whole model in the one quantized form, as every target receives it.

`q` maps module paths (model.layers.0.self_attn.q_proj) to qform.QTensor (codes, scales, zeros, g_idx, and the
linear's bias in QTensor.bias). `fp` holds every other tensor under its HF name: embeddings, norms (with any
AWQ/SmoothQuant input scales already folded in, so they differ from the merged checkpoint's), lm_head (unless
quantize_lm_head), and unquantized linears with their biases. Targets must take fp tensors from here, not from the
merged checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lorafast_export.model.spec import ModelConfig


@dataclass
class QuantizedModel:
    config: ModelConfig
    fp: dict[str, torch.Tensor]
    q: dict[str, object]  # module path → lorafast_export.qform.QTensor
    settings: dict = field(default_factory=dict)  # resolved quant settings (method, bits, group_size, ...)
