"""Session 33: chunked prefill against one forward in bf16 on the CPU (torch_bench's `small` shape with 2 layers,
random weights, 60 tokens, chunks of 8), each against the same model's float32 forward: whether the 8B bf16 chunked
run's different greedy tokens are rounding.

    python bench/results/s33_chunk_bf16.py
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench.torch_bench import config_of, hf_model  # noqa: E402
from lorafast_export.runtime.kv_cache import CacheConfig, PagedKVCache  # noqa: E402
from lorafast_export.runtime.paged import PagedModel, build_model  # noqa: E402

cfg, state = config_of(hf_model("small", torch.device("cpu"), torch.float32, layers=2))
n, chunk = 60, 8
ids = torch.randint(0, 2048, (n,), generator=torch.Generator().manual_seed(0))


def last_logits(dtype, size: int) -> torch.Tensor:
    """The last token's logits of the n-token prompt: one forward (size 0) or chunks of `size`."""
    dec, _ = build_model(cfg, state, None, "cpu", dtype, "auto")
    cache = PagedKVCache(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, CacheConfig(4, 64), dtype, "cpu")
    pm = PagedModel(dec, cache, "gather")
    cache.reserve(0, n + 1)
    for start in range(0, n, size or n):
        end = min(start + (size or n), n)
        piece, slots = ids[None, start:end], cache.slots(0, 0, end)
        got = pm.prefill(piece, slots) if start == 0 else pm.chunk(piece, start, slots)
    return got[0].float()


with torch.no_grad():
    ref = last_logits(torch.float32, 0)
    for dtype in (torch.float32, torch.bfloat16):
        whole, chunked = last_logits(dtype, 0), last_logits(dtype, chunk)
        print(
            f"{dtype}: max |logit diff| one forward vs float32 one forward {(whole - ref).abs().max():.3g}, "
            f"chunks vs float32 one forward {(chunked - ref).abs().max():.3g}, "
            f"chunks vs one forward {(chunked - whole).abs().max():.3g} (|logits| up to {ref.abs().max():.3g})"
        )
