"""Adapters saved inside PyTorch Lightning checkpoints (.ckpt)."""

from __future__ import annotations

from pathlib import Path

from lorafast_export.errors import UnsupportedError


def open_lightning_adapter(path: Path, weight: float, allow_pickle: bool):
    raise UnsupportedError(
        f"{path}: reading adapters from Lightning checkpoints is not supported in this version yet. "
        "Save the adapter with peft's save_pretrained and pass that directory."
    )
