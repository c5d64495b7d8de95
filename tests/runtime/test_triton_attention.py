"""The Triton paged decode kernel equals the gather reference (itself checked against dense SDPA).

Runs on CUDA, or on the CPU through Triton's interpreter when triton is installed (it is not a dependency:
CI without triton skips this file). It has run on the CPU interpreter only so far: no GPU run yet
(bench/TORCH.md)."""

import importlib.util
import os
import sys

import pytest
import torch

DEV = "cuda" if torch.cuda.is_available() else "cpu"
if DEV == "cpu" and "triton" not in sys.modules and importlib.util.find_spec("triton"):
    os.environ["TRITON_INTERPRET"] = "1"  # read when triton is first imported
pytest.importorskip("triton")

from lorafast_export.runtime.attention import decode_gather  # noqa: E402
from lorafast_export.runtime.triton_attention import num_splits, paged_decode  # noqa: E402
from tests.runtime.test_attention import scattered_pool  # noqa: E402


@pytest.fixture(scope="module")
def kernel():
    yield paged_decode
    os.environ.pop("TRITON_INTERPRET", None)  # triton reads it at every launch: keep it until the end


CASES = [  # lengths, kv heads, q heads, head dim, window
    ([1, 4, 17, 40], 2, 8, 16, None),  # GQA 4; 40 tokens = 3 blocks, several context splits
    ([3, 33, 70], 2, 4, 64, 20),  # sliding window
    ([200], 1, 1, 32, None),  # one row: many splits, most blocks of a split past the end
]


@pytest.mark.parametrize("lengths,hkv,hq,d,window", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_decode_equals_gather(kernel, lengths, hkv, hq, d, window, dtype):
    if dtype == torch.bfloat16 and DEV == "cpu":
        pytest.skip("the interpreter computes bf16 dots in numpy float: fp32 covers the logic on CPU")
    k_pool, v_pool, tables, lens, _ = scattered_pool(lengths, hkv=hkv, d=d, bs=16)
    q = torch.randn(len(lengths), hq, 1, d)
    k_pool, v_pool, q = (t.to(DEV, dtype) for t in (k_pool, v_pool, q))
    tables, lens = tables.to(DEV), lens.to(DEV)
    ref = decode_gather(q.float(), k_pool.float(), v_pool.float(), tables, lens, 16, window)[:, :, 0]
    out = kernel(q[:, :, 0], k_pool, v_pool, tables, lens, 16, window or 0).float()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert (out - ref).abs().max() <= tol * max(1.0, ref.abs().max().item())


def test_split_count():
    assert num_splits(1, 8, 64) == 32 and num_splits(32, 8, 64) == 2 and num_splits(1, 1, 3) == 3
