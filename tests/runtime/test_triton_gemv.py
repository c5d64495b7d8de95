"""The Triton dense GEMV (runtime/triton_gemv.py) equals the float64 product, and row i of a several-row
call equals the one-row call bit for bit (what a speculative verify needs). CUDA, or the CPU interpreter."""
# ruff: noqa: I001 - tests.runtime.triton_device must be imported before any kernel module

import pytest
import torch

from tests.runtime.triton_device import DEV  # first: sets the interpreter flag before triton loads
from lorafast_export.runtime.triton_gemv import GEMV_TILES, gemv, gemv_launch, rmsnorm


@pytest.mark.parametrize("n,k", [(64, 256), (40, 200), (24, 2048 + 64)])  # even; ragged N and K; long K
@pytest.mark.parametrize("rows", [1, 3, 5, 8])
def test_gemv_equals_float64_product(n, k, rows):
    g = torch.Generator().manual_seed(n + k + rows)
    x, w = torch.randn(rows, k, generator=g), torch.randn(n, k, generator=g) * 0.05
    ref = x.double() @ w.double().T
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        xd, wd = x.to(DEV, dtype), w.to(DEV, dtype)
        y = gemv(xd, wd).double().cpu()
        ref_d = xd.double().cpu() @ wd.double().cpu().T  # the product of the rounded inputs
        assert y.shape == (rows, n) and (y - ref_d).abs().max() <= tol * ref.abs().max(), dtype


@pytest.mark.parametrize("tiles", GEMV_TILES[:2])
def test_gemv_rows_are_independent_of_the_other_rows(tiles):
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(5, 512, generator=g), torch.randn(96, 512, generator=g) * 0.05
    x, w = x.to(DEV, torch.bfloat16), w.to(DEV, torch.bfloat16)
    five = gemv_launch(x, w, *tiles)
    for i in range(5):
        assert torch.equal(gemv_launch(x[i : i + 1], w, *tiles)[0], five[i])
    assert torch.equal(gemv_launch(x[:2], w, *tiles), five[:2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_equals_the_decoder_norm_and_rows_are_independent(dtype):
    from lorafast_export.model.decoder import RMSNorm

    g = torch.Generator().manual_seed(1)
    norm = RMSNorm(200, 1e-5).requires_grad_(False)
    norm.weight.data = 1 + 0.1 * torch.randn(200, generator=g)
    x = (torch.randn(5, 200, generator=g) * 3).to(dtype)
    norm = norm.to(DEV, dtype)
    x = x.to(DEV)
    ref = norm(x)
    y = rmsnorm(x, norm.weight, 1e-5)
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: an ulp of the two roundings
    assert y.dtype == ref.dtype and (y.float() - ref.float()).abs().max() <= tol * ref.float().abs().max()
    for i in range(5):
        assert torch.equal(rmsnorm(x[i : i + 1], norm.weight, 1e-5)[0], y[i])


def test_gemv_refuses_too_many_rows():
    with pytest.raises(ValueError, match="at most 8 rows"):
        gemv(torch.zeros(9, 64, device=DEV), torch.zeros(8, 64, device=DEV))


def test_runtime_with_dense_gemv_gives_the_reference_tokens(tmp_path):
    """dense_gemv='on': every dense linear of the decoder runs the GEMV at <= 8 rows (decode, the lm_head),
    F.linear above (the prefill of a 9-token prompt); greedy tokens equal the canonical decoder's."""
    from lorafast_export.model.decoder import load_decoder
    from lorafast_export.runtime.loader import build_runtime
    from lorafast_export.runtime.options import RuntimeOptions
    from lorafast_export.runtime.triton_gemv import GemvLinear, InvariantRMSNorm
    from tests.runtime.helpers import fp_state, greedy_reference, tiny_checkpoint

    md = tiny_checkpoint(tmp_path)
    opts = RuntimeOptions(compile="off", dense_gemv="on", max_seq_len=32, max_batch=2, batch_buckets=(1, 2))
    rt = build_runtime(md.config, fp_state(md), None, DEV, torch.float32, opts)
    gemvs = [m for m in rt.model.dec.modules() if isinstance(m, GemvLinear)]
    assert len(gemvs) == 4 * md.config.num_layers + 1  # qkv, o, gate_up, down per layer; the lm_head
    norms = [m for m in rt.model.dec.modules() if isinstance(m, InvariantRMSNorm)]
    assert len(norms) == 2 * md.config.num_layers + 1
    prompts = [[5, 9, 1, 44, 3, 17, 2, 8, 60], [7, 7]]
    dec = load_decoder(md)
    assert rt.generate_batch(prompts, 5) == [greedy_reference(dec, p, 5) for p in prompts]


@pytest.mark.parametrize("gemv_on", [True, False])
def test_verify_rows_equal_single_decode_steps_bit_for_bit(tmp_path, gemv_on):
    """A speculative verify (extend: S tokens per row) through the Triton decode kernel per token and the
    GEMV gives, for token s, the logits of a one-token decode step at that position, bit for bit: the
    property that makes speculative greedy output the plain step's token for token. With F.linear
    (gemv_on False) the matmuls of 1 and S rows are torch's, whose rows may differ in the last bits."""
    from lorafast_export.runtime.triton_gemv import use_gemv
    from tests.runtime.helpers import paged, tiny_checkpoint, verify_and_steps

    md = tiny_checkpoint(tmp_path, hidden=64, intermediate_size=96)
    pm, cache = paged(md, attention="triton", block_size=16, num_blocks=8, device=DEV)
    if gemv_on:
        use_gemv(pm.dec)
    verify, steps = verify_and_steps(pm, cache, DEV)
    same = [torch.equal(verify[j], steps[j]) for j in range(len(steps))]
    assert all(same) if gemv_on else torch.allclose(verify, torch.stack(steps), atol=1e-4)


def test_dense_gemv_auto_is_on_for_a_runtime_that_speculates(tmp_path, monkeypatch):
    """dense_gemv='auto' (the default): the GEMV for a runtime with a draft where Triton runs (CUDA; here
    the interpreter stands in), so its speculative output is its own greedy output; off without a draft
    and where Triton does not run."""
    from lorafast_export.model.decoder import load_decoder
    from lorafast_export.runtime import loader
    from lorafast_export.runtime.options import RuntimeOptions
    from lorafast_export.runtime.triton_gemv import GemvLinear
    from tests.runtime.helpers import fp_state, greedy_reference, tiny_checkpoint

    md = tiny_checkpoint(tmp_path, hidden=64, intermediate_size=96)
    opts = RuntimeOptions(compile="off", attention="gather", max_seq_len=32, max_batch=1, batch_buckets=(1,))
    assert opts.dense_gemv == "auto"
    opts = opts.replace(spec_k=2, speculation="always")  # every step a round (auto times plain steps first)
    monkeypatch.setattr(loader, "_triton_on", lambda device: True)
    draft = loader.build_runtime(md.config, fp_state(md), None, DEV, torch.float32, opts)
    rt = loader.build_runtime(md.config, fp_state(md), None, DEV, torch.float32, opts, draft=draft)
    assert rt.dense_gemv and not draft.dense_gemv
    assert any(isinstance(m, GemvLinear) for m in rt.model.dec.modules())
    prompt = [5, 9, 1, 44, 3, 17, 2, 8, 60]
    assert rt.generate_batch([prompt], 5) == [greedy_reference(load_decoder(md), prompt, 5)]
    assert rt.engine.stats.accepted > 0  # it speculated
    monkeypatch.setattr(loader, "_triton_on", lambda device: False)
    off = loader.build_runtime(md.config, fp_state(md), None, DEV, torch.float32, opts, draft=draft)
    assert not off.dense_gemv and not any(isinstance(m, GemvLinear) for m in off.model.dec.modules())
