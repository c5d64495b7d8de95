"""Builds the AOTInductor packages of the prefill and decode graphs for a torch-compile artifact (lowering).

Each package holds its own copy of the weights (two copies on disk) and is compiled for the build
machine's device type, the artifact dtype and one KV pool size (recorded in runtime.json), with dynamic
prompt length, decode batch and block-table width. The pools are graph inputs that the packages write in
place, so prefill and decode share one cache. Attention is the gather kernel (flex is not exported).
runtime/aot.py runs them.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.export import Dim

from lorafast_export.model.decoder import Decoder
from lorafast_export.runtime.aot import DECODE, PREFILL
from lorafast_export.runtime.artifact import read_meta, write_meta
from lorafast_export.runtime.kv_cache import PagedKVCache
from lorafast_export.runtime.loader import open_runtime
from lorafast_export.runtime.paged import decode_forward, prefill_forward


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
        return decode_forward(
            self.dec,
            tokens,
            positions,
            block_tables,
            seq_lens,
            slots,
            k_pool,
            v_pool,
            self.block_size,
            "gather",
        )


@torch.no_grad()
def compile_packages(
    dec: Decoder, cache: PagedKVCache, max_batch: int, max_seq_len: int, out_dir: Path
) -> dict:
    """Export + AOT-compile prefill and decode into out_dir; returns the runtime.json 'aot' entry."""
    dev = cache.k[0].device
    k = [torch.zeros_like(t) for t in cache.k]  # not the live pools: export rejects aliasing
    v = [torch.zeros_like(t) for t in cache.v]
    seq = Dim("seq", min=2, max=max(max_seq_len, 3))
    ids = torch.zeros(1, 3, dtype=torch.long, device=dev)
    ep = torch.export.export(
        _Prefill(dec),
        (ids, torch.arange(3, device=dev), k, v),
        dynamic_shapes=({1: seq}, {0: seq}, [None] * len(k), [None] * len(v)),
    )
    torch._inductor.aoti_compile_and_package(ep, package_path=str(out_dir / PREFILL))
    batch = Dim("batch", min=1, max=max(max_batch, 2))
    width = Dim("width", min=1, max=max(cache.blocks_for(max_seq_len), 2))

    def vec():  # a distinct tensor per input: export merges aliased example inputs into one graph input
        return torch.ones(2, dtype=torch.long, device=dev)

    args = (vec(), vec(), torch.zeros(2, 2, dtype=torch.int32, device=dev), vec(), vec(), k, v)
    dyn = (
        {0: batch},
        {0: batch},
        {0: batch, 1: width},
        {0: batch},
        {0: batch},
        [None] * len(k),
        [None] * len(v),
    )
    ep = torch.export.export(_Decode(dec, cache.block_size), args, dynamic_shapes=dyn)
    torch._inductor.aoti_compile_and_package(ep, package_path=str(out_dir / DECODE))
    return {
        "device": dev.type,
        "prefill": PREFILL,
        "decode": DECODE,
        "pool_slots": cache.slots_total,
        "attention": "gather",
        "torch": torch.__version__,
    }


def build_aot(model_dir: Path, device: str) -> dict:
    """Compile the packages for an artifact already written to model_dir; records them in runtime.json."""
    # the packages hold the plain step: the fused decode kernels are Python custom ops (runtime/triton_fused.py),
    # which AOTInductor cannot package
    rt = open_runtime(model_dir, device, use_aot=False, compile="off", attention="gather", fused_decode="off")
    entry = compile_packages(
        rt.model.dec, rt.cache, rt.options.max_batch, rt.engine.max_seq_len, Path(model_dir)
    )
    entry["kernels"] = rt.kernels
    meta = read_meta(model_dir)
    meta["aot"] = entry
    write_meta(Path(model_dir), meta)
    return entry
