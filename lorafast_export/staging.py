"""Host <-> GPU copies through one reusable pinned host buffer per GPU and direction (moved here from
validate/resident.py in session 8 so the runtime's artifact reads, a lower layer, share it): a copy from pageable
memory runs at ~1.1 GB/s on the H200 machine, a host copy into pinned memory and its DMA many times faster.
Used by validate/ (the resident base, the reference cache, the quantized stage) and by model/quantized.py's
`read_on_device` (the torch runtime's artifact load)."""

from __future__ import annotations

import logging

import numpy as np
import torch

from lorafast_export.errors import InputError

log = logging.getLogger(__name__)


class Staging:
    """One reusable host buffer, pinned for a GPU, through which host tensors reach the device: a copy from
    pageable memory runs at ~1.1 GB/s on the H200 machine, a host copy into pinned memory and its DMA many times
    faster. Copies are synchronous, so the buffer is free again when one returns."""

    def __init__(self, device):
        self.device = torch.device(device)
        self._buf: torch.Tensor | None = None

    def buffer(self, nbytes: int) -> torch.Tensor:
        """At least nbytes of host memory (pinned for a GPU), grown to the largest request (the embedding: 1 GB
        at 8B)."""
        if self._buf is None or self._buf.numel() < nbytes:
            self._buf = None
            try:
                self._buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.device.type == "cuda")
            except RuntimeError as e:  # page-locking refused (limits): pageable, slower, same bytes
                log.warning("pinned staging buffer refused (%s); copying through pageable memory", e)
                self._buf = torch.empty(nbytes, dtype=torch.uint8)
        return self._buf

    def to_device(self, t: torch.Tensor) -> torch.Tensor:
        """A copy of host tensor t on the device (contiguous, same dtype, shape and values)."""
        nbytes = t.numel() * t.element_size()
        out = torch.empty(t.shape, dtype=t.dtype, device=self.device)
        if nbytes:
            staged = self.buffer(nbytes)[:nbytes].view(t.dtype).view(t.shape)
            staged.copy_(t)
            out.copy_(staged)  # synchronous: the buffer is reused by the next copy
        return out

    def read(self, path, offset: int, nbytes: int, what: str) -> torch.Tensor:
        """nbytes of file `path` from `offset`, read straight into the buffer, as a uint8 tensor on the device."""
        staging = self.buffer(nbytes)
        with open(path, "rb") as fh:
            fh.seek(offset)
            if fh.readinto(memoryview(staging.numpy())[:nbytes]) != nbytes:
                raise InputError(f"{path}: {what} is truncated; the file is incomplete.")
        out = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        out.copy_(staging[:nbytes])  # synchronous: the buffer is reused by the next read
        return out

    def to_host(self, t: torch.Tensor) -> np.ndarray:
        """Device tensor t's values in the host buffer, as an array valid until the buffer's next use."""
        nbytes = t.numel() * t.element_size()
        staged = self.buffer(nbytes)[:nbytes].view(t.dtype).view(t.shape)
        staged.copy_(t)
        return staged.numpy()

    def release(self) -> None:
        self._buf = None


# Host tensors of at least this many bytes go to a GPU through a Staging buffer (to_device); smaller ones directly.
STAGED_MIN_BYTES = 1 << 20
_STAGING: dict[tuple[torch.device, str], Staging] = {}


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """t on `device`: a large host tensor bound for a GPU goes through a pinned staging buffer (kept for the next
    one), anything else through Tensor.to. The values are the same either way."""
    staging = _staging(device)
    if staging is None or t.device.type != "cpu" or t.numel() * t.element_size() < STAGED_MIN_BYTES:
        return t.to(device)
    return staging.to_device(t)


def _staging(device, direction: str = "in") -> Staging | None:
    """The staging buffer of a GPU for one direction ("in": host -> device, "out"), None for other devices."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return None
    if (dev, direction) not in _STAGING:
        _STAGING[dev, direction] = Staging(dev)
    return _STAGING[dev, direction]


def read_to_device(path, offset: int, nbytes: int, device, what: str) -> torch.Tensor:
    """nbytes of a file from offset as a uint8 tensor on `device` (a GPU: through its pinned staging buffer)."""
    staging = _staging(device)
    if staging is not None:
        return staging.read(path, offset, nbytes, what)
    buf = bytearray(nbytes)  # writable: torch.frombuffer shares it without a copy
    with open(path, "rb") as fh:
        fh.seek(offset)
        if fh.readinto(buf) != nbytes:
            raise InputError(f"{path}: {what} is truncated; the file is incomplete.")
    return (
        torch.frombuffer(buf, dtype=torch.uint8).to(device) if nbytes else torch.empty(0, dtype=torch.uint8)
    )


def to_host(t: torch.Tensor) -> np.ndarray:
    """t's values as a host array; from a GPU through its pinned staging buffer, where the array is valid only
    until the next to_host of that GPU (the caller writes it out at once)."""
    staging = _staging(t.device, "out")
    if staging is None or t.numel() * t.element_size() < STAGED_MIN_BYTES:
        return t.cpu().numpy()
    return staging.to_host(t)


def release_staging() -> None:
    """Frees the staging buffers of to_device / read_to_device / to_host (done when a validation ends)."""
    _STAGING.clear()
