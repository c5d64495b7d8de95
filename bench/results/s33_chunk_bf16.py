"""Session 33: chunked prefill against one forward in bf16 on the CPU (tiny llama, 60 tokens, chunks of 8), each
against the float32 canonical decoder: whether the 8B bf16 chunked run's different greedy tokens are rounding.

    python bench/results/s33_chunk_bf16.py
"""

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from lorafast_export.model.decoder import load_decoder  # noqa: E402
from tests.runtime.helpers import paged, tiny_checkpoint  # noqa: E402

torch.manual_seed(0)
md = tiny_checkpoint(Path(tempfile.mkdtemp()), "llama")
n, chunk = 60, 8
ids = torch.randint(0, 96, (n + 1,))
with torch.no_grad():
    ref = load_decoder(md)(ids[None])[0][0].float()[n - 1]
    for dtype in (torch.float32, torch.bfloat16):
        last = {}
        for size in (0, chunk):
            pm, cache = paged(md, dtype=dtype, num_blocks=64)
            cache.reserve(0, n + 1)
            for start in range(0, n, size or n):
                end = min(start + (size or n), n)
                piece, slots = ids[None, start:end], cache.slots(0, 0, end)
                got = pm.prefill(piece, slots) if start == 0 else pm.chunk(piece, start, slots)
            last[size] = got[0].float()
        print(
            f"{dtype}: max |logit diff| one forward vs float32 decoder {(last[0] - ref).abs().max():.3g}, "
            f"chunks vs float32 decoder {(last[chunk] - ref).abs().max():.3g}, "
            f"chunks vs one forward {(last[chunk] - last[0]).abs().max():.3g}"
        )
