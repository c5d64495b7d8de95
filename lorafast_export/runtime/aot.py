"""AOTInductor packages of the prefill and decode graphs, and a model that runs them without our Python model.

Each package holds its own copy of the weights (two copies on disk) and is compiled for the build
machine's device type, the artifact dtype and one KV pool size (recorded in runtime.json), with dynamic
prompt length, decode batch and block-table width. The pools are graph inputs that the packages write in
place, so prefill and decode share one cache. Attention is the gather kernel (flex is not exported).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.export import Dim

from lorafast_export.model.decoder import Decoder
from lorafast_export.runtime.kv_cache import PagedKVCache
from lorafast_export.runtime.model import decode_forward, prefill_forward

PREFILL, DECODE = "prefill.pt2", "decode.pt2"


class _Prefill(nn.Module):
    def __init__(self, dec: Decoder):
        super().__init__()
        self.dec = dec

    def forward(self, ids, slots, k_pool, v_pool):  # [1, s], [s] → [1, s, V]
        return prefill_forward(self.dec, ids, slots, k_pool, v_pool, last_only=False)


class _Decode(nn.Module):
    def __init__(self, dec: Decoder, block_size: int):
        super().__init__()
        self.dec, self.block_size = dec, block_size

    def forward(self, tokens, positions, block_tables, seq_lens, slots, k_pool, v_pool):
        return decode_forward(self.dec, tokens, positions, block_tables, seq_lens, slots, k_pool, v_pool,
                              self.block_size, "gather")


@torch.no_grad()
def compile_packages(dec: Decoder, cache: PagedKVCache, max_batch: int, max_seq_len: int, out_dir: Path) -> dict:
    """Export + AOT-compile prefill and decode into out_dir; returns the runtime.json 'aot' entry."""
    dev = cache.k[0].device
    k = [torch.zeros_like(t) for t in cache.k]  # not the live pools: export rejects aliasing
    v = [torch.zeros_like(t) for t in cache.v]
    seq = Dim("seq", min=2, max=max(max_seq_len, 3))
    ids = torch.zeros(1, 3, dtype=torch.long, device=dev)
    ep = torch.export.export(_Prefill(dec), (ids, torch.arange(3, device=dev), k, v),
                             dynamic_shapes=({1: seq}, {0: seq}, [None] * len(k), [None] * len(v)))
    torch._inductor.aoti_compile_and_package(ep, package_path=str(out_dir / PREFILL))
    batch = Dim("batch", min=1, max=max(max_batch, 2))
    width = Dim("width", min=1, max=max(cache.blocks_for(max_seq_len), 2))
    def vec():  # a distinct tensor per input: export merges aliased example inputs into one graph input
        return torch.ones(2, dtype=torch.long, device=dev)

    args = (vec(), vec(), torch.zeros(2, 2, dtype=torch.int32, device=dev), vec(), vec(), k, v)
    dyn = ({0: batch}, {0: batch}, {0: batch, 1: width}, {0: batch}, {0: batch}, [None] * len(k), [None] * len(v))
    ep = torch.export.export(_Decode(dec, cache.block_size), args, dynamic_shapes=dyn)
    torch._inductor.aoti_compile_and_package(ep, package_path=str(out_dir / DECODE))
    return {"device": dev.type, "prefill": PREFILL, "decode": DECODE, "pool_slots": cache.slots_total,
            "attention": "gather", "torch": torch.__version__}


class AOTModel:
    """Same interface as model.PagedModel (prefill, __call__ = decode step), running the two packages."""

    def __init__(self, model_dir: Path, aot: dict, cache: PagedKVCache):
        self.prefill_pkg = torch._inductor.aoti_load_package(str(Path(model_dir) / aot["prefill"]))
        self.decode_pkg = torch._inductor.aoti_load_package(str(Path(model_dir) / aot["decode"]))
        self.cache = cache

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor, slots: torch.Tensor | None, last_only: bool = True) -> torch.Tensor:
        if slots is None:  # logits only: borrow blocks for the prompt, give them back
            scratch = -1
            self.cache.reserve(scratch, ids.shape[1])
            try:
                return self.prefill(ids, self.cache.slots(scratch, 0, ids.shape[1]).to(ids.device), last_only)
            finally:
                self.cache.free(scratch)
        if ids.shape[1] == 1:  # a one-token prompt is exactly one decode step at position 0
            block = (slots[:1] // self.cache.block_size).int()[None]  # [1, 1]
            zero = torch.zeros(1, dtype=torch.long, device=ids.device)
            logits = self(ids[0], zero, block, zero + 1, slots[:1])[:, None]
        else:
            logits = self.prefill_pkg(ids, slots, self.cache.k, self.cache.v)  # [1, s, V]
        return logits[:, -1] if last_only else logits

    @torch.no_grad()
    def __call__(self, tokens, positions, block_tables, seq_lens, slots) -> torch.Tensor:
        return self.decode_pkg(tokens, positions, block_tables, seq_lens, slots, self.cache.k, self.cache.v)


def build_aot(model_dir: Path, device: str) -> dict:
    """Compile the packages for an artifact already written to model_dir; records them in runtime.json."""
    from lorafast_export.runtime.artifact import read_meta, write_meta
    from lorafast_export.runtime.loader import open_runtime

    rt = open_runtime(model_dir, device, use_aot=False, compile="off", attention="gather")
    entry = compile_packages(rt.model.dec, rt.cache, rt.options.max_batch, rt.engine.max_seq_len, Path(model_dir))
    entry["kernels"] = rt.kernels
    meta = read_meta(model_dir)
    meta["aot"] = entry
    write_meta(Path(model_dir), meta)
    return entry
