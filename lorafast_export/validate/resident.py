"""The base checkpoint held on the validation GPU for the whole validate stage (issue 13).

Most validation stages derive from the base: the streamed reference, the bare base, merged-fp32, merged-<dtype>
of a build that merges on read, the quantized stage's weight errors. Without this module each of them reads
the base from the host again: the walk once, and every whole-model greedy decoder once more (on the H200
machine through pageable memory at ~1.1 GB/s: ~14 s per 16 GB copy of an 8B model, four copies per build).

`ResidentStore` wraps the base's WeightStore: each tensor is read once, through a pinned staging buffer, and
kept on the device as stored (bf16 stays bf16: 16 GB for an 8B model). Stages that read only resident tensors
(`LayerSource.builds_on_device`) decode by building each layer from it at every step (layers.BuiltDecoder,
on_demand) instead of holding an fp32 copy of the whole model, so the GPU holds one copy of the base and not
one fp32 copy per greedy stage. Once the last stage that needs the base has decoded, `release()` frees it; later
reads (none in a build) fall back to the wrapped store. Numbers do not change: the same tensors reach the same
float32 arithmetic, only from device memory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os

import torch

from lorafast_export.staging import (  # noqa: F401  (re-exported: validate's modules and tests use them here)
    STAGED_MIN_BYTES,
    Staging,
    read_to_device,
    release_staging,
    to_device,
    to_host,
)

log = logging.getLogger(__name__)

# LORAFAST_RESIDENT=1 makes the base resident on any device (a CPU rehearsal of the GPU path), =0 never.
RESIDENT_ENV = "LORAFAST_RESIDENT"
# The base is made resident only when its stored bytes fit in this share of the GPU's free memory (the rest
# holds the walk's hidden states, the heads, and the largest decoder that is not built from the base).
RESIDENT_SHARE = 0.4


class ResidentStore:
    """A WeightStore whose `get` returns device tensors, each read from the host once and kept."""

    def __init__(self, store, device):
        self.store, self.device = store, torch.device(device)
        self._cache: dict[str, torch.Tensor] = {}
        self._staging = Staging(self.device)
        self.active = True
        self.bytes_read = 0  # bytes copied host -> device (tests and the bench count them)

    def __getattr__(
        self, name
    ):  # keys, shape_of, dtype_of, files, file_of, copy_to, ...: the wrapped store's
        if name == "store":
            raise AttributeError(name)
        return getattr(self.store, name)

    def __contains__(self, name: str) -> bool:
        return name in self.store

    def resident_on(self, device) -> bool:
        return self.active and torch.device(device).type == self.device.type

    def get(self, name: str) -> torch.Tensor:
        t = self._cache.get(name)
        if t is None:
            t = self._read(name)
            if self.active:
                self._cache[name] = t
        return t

    def _read(self, name: str) -> torch.Tensor:
        span = self.store.span_of(name) if hasattr(self.store, "span_of") else None
        if span is None or span[2] == 0:  # pickled or empty: as the store gives it
            t = self.store.get(name).to(self.device)
        else:
            path, offset, nbytes, dtype, shape = span
            out = self._staging.read(path, offset, nbytes, f"tensor {name!r}")
            t = out.view(dtype).reshape(shape)
        self.bytes_read += t.numel() * t.element_size()
        return t

    def release(self) -> None:
        """Free the device copies (and the staging buffer); later reads go to the wrapped store each time."""
        self.active = False
        self._cache.clear()
        self._staging.release()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def stored_bytes(store) -> int:
    total = 0
    for k in store.keys():
        n = 1
        for d in store.shape_of(k):
            n *= d
        total += n * store.dtype_of(k).itemsize
    return total


def _adapter_on(ad, device):
    """A copy of an Adapter whose tensors (A, B, DoRA magnitudes, modules_to_save) are on the device."""
    modules = {
        k: dataclasses.replace(
            m,
            a=m.a.to(device),
            b=m.b.to(device),
            magnitude=None if m.magnitude is None else m.magnitude.to(device),
        )
        for k, m in ad.modules.items()
    }
    return dataclasses.replace(
        ad, modules=modules, replacements={k: t.to(device) for k, t in ad.replacements.items()}
    )


def make_resident(base, adapters: list, device, force: bool = False):
    """(base, adapters) with the base's tensors served from the device (ResidentStore) and the adapters' tensors
    on it, when `device` is a GPU with room (RESIDENT_SHARE of its free memory); else unchanged. `force` makes
    them resident on any device (tests prove the resident path equal to the streamed one on the CPU)."""
    dev = torch.device(device)
    choice = os.environ.get(RESIDENT_ENV)
    if choice == "0":
        return base, adapters
    if not (force or choice == "1"):
        if dev.type != "cuda":
            return base, adapters
        free, _ = torch.cuda.mem_get_info()
        free += torch.cuda.memory_reserved() - torch.cuda.memory_allocated()  # cached by torch, reusable
        need = stored_bytes(base.store)
        if need > RESIDENT_SHARE * free:
            log.info(
                "validation streams the base from the host: %.1f GB > %.0f%% of %.1f GB free on the GPU",
                need / 1e9,
                100 * RESIDENT_SHARE,
                free / 1e9,
            )
            return base, adapters
    store = ResidentStore(base.store, dev)
    return dataclasses.replace(base, store=store), [_adapter_on(a, dev) for a in adapters]


def release_resident(base) -> None:
    """Free the device copies of a base made resident by make_resident (no-op for any other base)."""
    if isinstance(base.store, ResidentStore):
        base.store.release()


@contextlib.contextmanager
def resident(base, adapters: list, device, progress=lambda m: None):
    """make_resident for the duration of a validation, released at its end; progress says whether the base was
    held on the device and how many bytes it cost to bring there."""
    base, adapters = make_resident(base, adapters, device)
    store = base.store
    held = isinstance(store, ResidentStore)
    if held:
        progress(f"base held on {store.device.type} for the validation ({stored_bytes(store) / 1e9:.2f} GB)")
    try:
        yield base, adapters
    finally:
        release_resident(base)
        release_staging()
        if held:
            progress(f"resident base: {store.bytes_read / 1e9:.2f} GB copied host -> device")
