"""Where the bundle's tensors come from: the merged checkpoint (fp, read tensor by tensor) or the QuantizedModel.

`Linear` is one linear layer in the form both writers start from: the fp weight, or the signed integer
weights + float32 scales of its quant_algo; the writers only rename, pack and split it. When the bundle's MLP
width is padded (scheme.mlp_width), gate/up_proj come with extra output rows and down_proj with extra input
columns, all integer 0 (scale 1 where a whole group or row is new): they dequantize to exactly 0 (qform.pad_qtensor).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from lorafast_export.model.spec import EMBED, LM_HEAD, ModelConfig
from lorafast_export.qform import pad_qtensor
from lorafast_export.targets.trt_llm.pack import signed_codes
from lorafast_export.targets.trt_llm.scheme import W8A8_SQ, W8A16, TrtScheme
from lorafast_export.weights import open_model


@dataclass
class Linear:
    weight: torch.Tensor  # fp [out, in] in the bundle dtype, or int8 signed values [out, in]
    scale: torch.Tensor | None  # float32: [out] (W8A16, W8A8_SQ) or [out, in/group] (W4A16_AWQ); None when fp
    bias: torch.Tensor | None  # [out] in the bundle dtype

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]


class Weights:
    """fp(name) and linear(module) in the bundle dtype, from a QuantizedModel or the merged checkpoint."""

    def __init__(
        self,
        merged_dir: Path,
        cfg: ModelConfig,
        qm,
        scheme: TrtScheme,
        dtype: torch.dtype,
        mlp_width: int | None = None,
    ):
        self.cfg, self.qm, self.scheme, self.dtype = cfg, qm, scheme, dtype
        self.mlp_width = mlp_width or cfg.intermediate_size  # the bundle's intermediate_size (padded or not)
        self.store = None if qm is not None else open_model(merged_dir).store

    def _get(self, name: str) -> torch.Tensor | None:
        if self.qm is not None:
            return self.qm.fp.get(name)
        return self.store.get(name) if name in self.store else None

    def fp(self, name: str) -> torch.Tensor:
        t = self._get(name)
        if t is None and name == LM_HEAD and self.cfg.tie_word_embeddings:  # engine checkpoints store both
            return self._get(EMBED).to(self.dtype, copy=True)
        return t.to(self.dtype)

    def fp_names(self) -> list[str]:
        """Every tensor that is not part of a quantized linear (HF names)."""
        names = self.qm.fp.keys() if self.qm is not None else self.store.keys()
        return sorted(n for n in names if not n.endswith("rotary_emb.inv_freq"))

    def linear(self, module: str) -> Linear:
        qt = None if self.qm is None else self.qm.q.get(module)
        if qt is None:
            bias = self._get(f"{module}.bias")
            return Linear(self.fp(f"{module}.weight"), None, None if bias is None else bias.to(self.dtype))
        if module.endswith(("mlp.gate_proj", "mlp.up_proj")):
            qt = pad_qtensor(qt, out_features=self.mlp_width)
        elif module.endswith("mlp.down_proj"):
            qt = pad_qtensor(qt, in_features=self.mlp_width)
        scale = qt.scales.float()
        if self.scheme.quant_algo in (W8A16, W8A8_SQ):
            scale = scale[:, 0]  # per channel: [out, 1] → [out]
        bias = None if qt.bias is None else qt.bias.to(self.dtype)
        return Linear(signed_codes(qt), scale.contiguous(), bias)
