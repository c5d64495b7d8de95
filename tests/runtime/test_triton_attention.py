"""The Triton paged decode kernel equals the gather reference (itself checked against dense SDPA).

Runs on CUDA, or on the CPU through Triton's interpreter (tests/runtime/triton_device.py)."""
# ruff: noqa: I001 - tests.runtime.triton_device must be imported before any kernel module

import pytest
import torch

from tests.runtime.triton_device import DEV  # first: sets the interpreter flag before triton loads
from lorafast_export.runtime.attention import decode_gather
from lorafast_export.runtime.attention import PLAN_MIN_ROWS, decode_plan, num_splits
from lorafast_export.runtime.triton_attention import paged_decode
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


@pytest.mark.parametrize("lengths,hkv,hq,d,window", CASES)
@pytest.mark.parametrize("splits", [0, 1, 3])
def test_last_program_merge_equals_the_merge_kernel(lengths, hkv, hq, d, window, splits):
    """counters (option attn_last_merges): one kernel whose last program of each (row, kv head) merges the splits
    gives the two-kernel path's output bit for bit, leaves every counter at 0, and does so again on the same
    counters (what the next layer and the next step reuse)."""
    k_pool, v_pool, tables, lens, _ = scattered_pool(lengths, hkv=hkv, d=d, bs=16)
    q = torch.randn(len(lengths), hq, d, generator=torch.Generator().manual_seed(len(lengths) + hq))
    k_pool, v_pool, q, tables, lens = (t.to(DEV) for t in (k_pool, v_pool, q, tables, lens))
    want = paged_decode(q, k_pool, v_pool, tables, lens, 16, window or 0, splits)
    counters = torch.zeros(len(lengths) * hkv + 3, dtype=torch.int32, device=DEV)
    for _ in range(2):
        got = paged_decode(q, k_pool, v_pool, tables, lens, 16, window or 0, splits, counters=counters)
        assert torch.equal(got, want) and not counters.any()
    # too few counters for the rows: the two-kernel path, untouched counters
    short = torch.zeros(len(lengths) * hkv - 1, dtype=torch.int32, device=DEV)
    assert torch.equal(
        paged_decode(q, k_pool, v_pool, tables, lens, 16, window or 0, splits, counters=short), want
    )


def test_last_program_merge_is_done_by_the_last_program_only(monkeypatch):
    """A counter that does not start at 0 (a program that is never last) leaves that pair unmerged: the merge really
    runs in the kernel, once per (row, kv head), by the program that counts to SPLITS."""
    k_pool, v_pool, tables, lens, _ = scattered_pool([40, 70], hkv=2, d=32, bs=16)
    q = torch.randn(2, 4, 32, generator=torch.Generator().manual_seed(7))
    k_pool, v_pool, q, tables, lens = (t.to(DEV) for t in (k_pool, v_pool, q, tables, lens))
    want = paged_decode(q, k_pool, v_pool, tables, lens, 16, 0, 3)
    counters = torch.zeros(4, dtype=torch.int32, device=DEV)
    counters[1] = 100  # row 0, kv head 1: its count never reaches SPLITS - 1
    got = paged_decode(q, k_pool, v_pool, tables, lens, 16, 0, 3, counters=counters)
    assert torch.equal(got[0, :2], want[0, :2]) and torch.equal(got[1], want[1])  # the other pairs merged
    assert not torch.equal(got[0, 2:], want[0, 2:])  # query heads 2-3 of row 0 (kv head 1) were not
    assert counters.tolist() == [0, 103, 0, 0]


@pytest.mark.parametrize("lengths,hkv,hq,d,window", CASES)
@pytest.mark.parametrize("splits,blocks", [(1, 1), (1, 4), (2, 2), (3, 8)])
def test_blocks_an_iteration_and_one_split(lengths, hkv, hq, d, window, splits, blocks):
    """Several cache blocks a loop iteration (one dot over their keys) give the gather reference's output, and
    one split written by the decode kernel itself equals the same split merged by the last program's merge
    (the two-kernel path's arithmetic), bit for bit."""
    k_pool, v_pool, tables, lens, _ = scattered_pool(lengths, hkv=hkv, d=d, bs=16)
    q = torch.randn(len(lengths), hq, d, generator=torch.Generator().manual_seed(3 * hq + blocks))
    k_pool, v_pool, q, tables, lens = (t.to(DEV) for t in (k_pool, v_pool, q, tables, lens))
    ref = decode_gather(q[:, :, None], k_pool, v_pool, tables, lens, 16, window)[:, :, 0]
    got = paged_decode(q, k_pool, v_pool, tables, lens, 16, window or 0, splits, blocks=blocks)
    assert (got - ref).abs().max() <= 1e-5 * max(1.0, ref.abs().max().item())
    if splits == 1:
        counters = torch.zeros(len(lengths) * hkv, dtype=torch.int32, device=DEV)
        merged = paged_decode(
            q, k_pool, v_pool, tables, lens, 16, window or 0, 1, counters=counters, blocks=blocks
        )
        assert torch.equal(got, merged)


def test_decode_plan_gives_the_kernel_powers_of_two():
    """decode_plan's blocks size the kernel's tile (tl.arange: a power of two) and its splits the grid, for any
    table width the engine passes (max_blocks need not be a power of two); below PLAN_MIN_ROWS (row, kv head)
    pairs it is num_splits' plan, one block an iteration."""
    for batch in (1, 3, 7, 8, 32, 64):
        for width in range(1, 300):
            splits, blocks = decode_plan(batch, 8, width)
            if batch * 8 < PLAN_MIN_ROWS:
                assert (splits, blocks) == (num_splits(batch, 8, width), 1)
                continue
            assert splits & (splits - 1) == 0 and blocks & (blocks - 1) == 0, (batch, width, splits, blocks)
            assert 1 <= splits <= max(1, width) and 1 <= blocks <= 8


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

    counters = torch.zeros(len(lengths) * 2, dtype=torch.int32, device=DEV)

    def run(pdl: bool, early: bool = False, cnt=None):
        q = q0 * 2  # written by the kernel just before
        return paged_decode(q, k_pool, v_pool, tables, lens, 16, 0, 0, pdl, early, cnt) * 1

    want = run(False)
    for early in (False, True):  # early: each kernel lets the next launch before it waits
        for cnt in (None, counters):  # counters: one kernel, the last program merges (attn_last_merges)
            assert torch.equal(run(True, early, cnt), want)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                got = run(True, early, cnt)
            for _ in range(3):
                g.replay()
                torch.cuda.synchronize()
                assert torch.equal(got, want) and not counters.any()


def test_layers_with_last_program_merges_give_the_two_kernel_logits(tmp_path, monkeypatch):
    """use_attn_last_merges (option attn_last_merges): every layer's decode steps and a 3-token verify through the
    one-kernel attention (no merge kernel launched) give the two-kernel logits bit for bit, and the shared counters
    end at 0. Context splits as sessions 9-38 planned them (decode_plan gives these narrow tables one split, which
    has no merge either way)."""
    from lorafast_export.runtime import paged as paged_mod
    from lorafast_export.runtime import triton_attention
    from lorafast_export.runtime.paged import use_attn_last_merges

    from tests.runtime.helpers import paged, tiny_checkpoint, verify_and_steps

    monkeypatch.setattr(
        paged_mod, "decode_plan", lambda b, hkv, width, sms=132: (num_splits(b, hkv, width, sms), 1)
    )
    md = tiny_checkpoint(tmp_path, hidden=64, intermediate_size=96)
    merges = []

    class Counted:  # the merge kernel, its launches counted
        def __getitem__(self, grid):
            merges.append(grid)
            return merge[grid]

    merge = triton_attention._merge_kernel
    monkeypatch.setattr(triton_attention, "_merge_kernel", Counted())

    def run(last: bool):
        merges.clear()
        pm, cache = paged(md, attention="triton", block_size=16, num_blocks=8, device=DEV)
        if last:
            use_attn_last_merges(pm.dec, DEV, rows=4)
        return pm, verify_and_steps(pm, cache, DEV), len(merges)

    _, (verify, steps), two = run(False)
    pm, (verify_last, steps_last), one = run(True)
    assert two == 4 * md.config.num_layers and one == 0  # 3 steps + the verify, each layer
    counters = {id(layer.attn_counters) for layer in pm.dec.model.layers}
    assert len(counters) == 1 and not pm.dec.model.layers[0].attn_counters.any()
    assert torch.equal(verify_last, verify) and all(
        torch.equal(a, b) for a, b in zip(steps_last, steps, strict=True)
    )


def test_the_layers_plan_their_attention_for_their_gpu(tmp_path, monkeypatch):
    """use_device_sms gives each layer its GPU's streaming multiprocessors (torch.cuda's properties, a stand-in here),
    and the paged layer's decode steps and a verify's rows plan their attention (decode_plan) with that count;
    off CUDA it changes nothing."""
    import types

    from lorafast_export.runtime import paged as paged_mod

    from tests.runtime.helpers import paged, tiny_checkpoint, verify_and_steps

    md = tiny_checkpoint(tmp_path, hidden=64, intermediate_size=96)
    pm, cache = paged(md, attention="triton", block_size=16, num_blocks=8, device=DEV)
    assert paged_mod.use_device_sms(pm.dec, "cpu") is None
    assert not any(hasattr(layer, "attn_sms") for layer in pm.dec.model.layers)
    props = types.SimpleNamespace(multi_processor_count=7)
    with monkeypatch.context() as m:  # only around the call: on a GPU torch itself reads the properties later
        m.setattr(torch.cuda, "get_device_properties", lambda device: props)
        assert paged_mod.use_device_sms(pm.dec, "cuda") == 7
    seen, plan = [], paged_mod.decode_plan
    monkeypatch.setattr(
        paged_mod, "decode_plan", lambda b, hkv, width, sms: seen.append(sms) or plan(b, hkv, width, sms)
    )
    verify_and_steps(pm, cache, DEV)
    assert len(seen) >= 4 * md.config.num_layers and set(seen) == {7}  # 3 steps and the verify, each layer
