"""The torch model a lowering starts from: the canonical decoder, fp or holding the quantized form."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from lorafast_export.model.decoder import Decoder, load_decoder
from lorafast_export.model.quantized import fake_quant_decoder
from lorafast_export.qform import QTensor


def set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def decoder_from_quantized(qm, make_linear: Callable[[QTensor], nn.Module]) -> Decoder:
    """fake_quant_decoder(qm) with each quantized linear replaced by make_linear(its QTensor)."""
    dec = fake_quant_decoder(qm)
    for path, qt in qm.q.items():
        set_module(dec, path, make_linear(qt))
    return dec


def source_decoder(merged_dir: Path, quantized, make_linear: Callable[[QTensor], nn.Module]) -> Decoder:
    """The merged checkpoint's fp decoder, or the quantized model's decoder when a quant method ran."""
    if quantized is None:
        from lorafast_export.weights import open_model

        return load_decoder(open_model(merged_dir), torch.float32)
    return decoder_from_quantized(quantized, make_linear)
