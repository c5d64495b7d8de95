"""Runs the AOTInductor packages of the prefill and decode graphs (built by targets/torch_compile/aot.py) without our
Python model.

Each package holds its own copy of the weights (two copies on disk) and is compiled for the build
machine's device type, the artifact dtype and one KV pool size (recorded in runtime.json), with dynamic
prompt length, decode batch and block-table width. The pools are graph inputs that the packages write in
place, so prefill and decode share one cache. Attention is the gather kernel (flex is not exported).
"""

from __future__ import annotations

from pathlib import Path

import torch

from lorafast_export.runtime.kv_cache import PagedKVCache

PREFILL, DECODE = "prefill.pt2", "decode.pt2"


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
