"""Adapters: PEFT directories (peft.py) and PyTorch Lightning checkpoints (lightning.py), read into one form."""

from __future__ import annotations

import math
from pathlib import Path

from lorafast_export.adapters.lightning import open_lightning_adapter
from lorafast_export.adapters.peft import Adapter, AdapterModule, open_peft_adapter, parse_adapter_spec
from lorafast_export.errors import InputError

__all__ = ["Adapter", "AdapterModule", "open_adapter", "parse_adapter_spec"]


def open_adapter(spec: str, allow_pickle: bool = False, overrides: dict | None = None) -> Adapter:
    """`path[:weight]`: a PEFT adapter directory, or a PyTorch Lightning .ckpt (`overrides`: lora_alpha/use_rslora
    for it)."""
    path_s, weight = parse_adapter_spec(spec)
    if not math.isfinite(weight):
        raise InputError(f"{spec}: the adapter weight must be a finite number, got {weight}.")
    path = Path(path_s)
    if path.is_file():
        if path.suffix != ".ckpt":
            raise InputError(f"{path}: an adapter is a PEFT directory or a Lightning .ckpt file.")
        return open_lightning_adapter(path, weight, allow_pickle, overrides)
    return open_peft_adapter(path, weight, allow_pickle)
