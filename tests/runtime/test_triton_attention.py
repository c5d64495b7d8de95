"""The Triton paged decode kernel equals the gather reference (itself checked against dense SDPA).

Runs on CUDA, or on the CPU through Triton's interpreter (tests/runtime/triton_device.py)."""
# ruff: noqa: I001 - tests.runtime.triton_device must be imported before any kernel module

import pytest
import torch

from tests.runtime.triton_device import DEV  # first: sets the interpreter flag before triton loads
from lorafast_export.runtime.attention import decode_gather
from lorafast_export.runtime.triton_attention import num_splits, paged_decode
from lorafast_export.testing import TRITON_DECODE_CASES as CASES
from lorafast_export.testing import scattered_pool


@pytest.mark.parametrize("lengths,hkv,hq,d,window", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_decode_equals_gather(lengths, hkv, hq, d, window, dtype):
    if dtype == torch.bfloat16 and DEV == "cpu":
        pytest.skip("the interpreter computes bf16 dots in numpy float: fp32 covers the logic on CPU")
    k_pool, v_pool, tables, lens, _ = scattered_pool(lengths, hkv=hkv, d=d, bs=16)
    q = torch.randn(len(lengths), hq, 1, d)
    k_pool, v_pool, q = (t.to(DEV, dtype) for t in (k_pool, v_pool, q))
    tables, lens = tables.to(DEV), lens.to(DEV)
    ref = decode_gather(q.float(), k_pool.float(), v_pool.float(), tables, lens, 16, window)[:, :, 0]
    out = paged_decode(q[:, :, 0], k_pool, v_pool, tables, lens, 16, window or 0).float()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert (out - ref).abs().max() <= tol * max(1.0, ref.abs().max().item())


def test_split_count():
    assert num_splits(1, 8, 64) == 32 and num_splits(32, 8, 64) == 2 and num_splits(1, 1, 3) == 3


@pytest.mark.skipif(
    DEV != "cuda" or torch.cuda.get_device_capability() < (9, 0),
    reason="programmatic dependent launch: sm90+",
)
def test_programmatic_dependent_launch_gives_the_same_bits():
    """Both kernels launched as programmatic dependent launches (each waits for the kernel before it: here the
    one that writes q), eagerly and replayed from a CUDA graph: the plain launch's output, bit for bit."""
    lengths = [37, 5, 130]
    k_pool, v_pool, tables, lens, _ = scattered_pool(lengths, hkv=2, d=64, bs=16)
    k_pool, v_pool = k_pool.to(DEV, torch.bfloat16), v_pool.to(DEV, torch.bfloat16)
    tables, lens = tables.to(DEV), lens.to(DEV)
    q0 = torch.randn(len(lengths), 8, 64, device=DEV, dtype=torch.bfloat16)

    def run(pdl: bool, early: bool = False):
        q = q0 * 2  # written by the kernel just before
        return paged_decode(q, k_pool, v_pool, tables, lens, 16, 0, 0, pdl, early) * 1

    want = run(False)
    for early in (False, True):  # early: each kernel lets the next launch before it waits
        assert torch.equal(run(True, early), want)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            got = run(True, early)
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(got, want)
