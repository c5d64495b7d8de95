"""The same math on a CUDA device gives the CPU's answer (skipped where no GPU is visible)."""

import pytest
import torch
import torch.nn.functional as F

from lorafast_export.qform import QLinear, dequantize, qtensor_to
from lorafast_export.quant.awq import awq_search_clip, awq_search_scale
from lorafast_export.quant.formats import pack_awq, pack_compressed_tensors, pack_gptq
from lorafast_export.quant.gptq import accumulate_hessian, gptq_quantize, refit_scales
from lorafast_export.quant.rtn import fake_quantize_rtn, quantize_codes, quantize_rtn
from lorafast_export.quant.search import search_qparams
from tests.quant.helpers import assert_same_qtensor, correlated_inputs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def test_rtn_and_packers_match_cpu():
    w = torch.randn(64, 256) * 0.05
    for sym in (True, False):
        cpu = quantize_rtn(w, 4, 32, sym)
        gpu = quantize_rtn(w.cuda(), 4, 32, sym)
        assert gpu.codes.is_cuda
        assert_same_qtensor(qtensor_to(gpu, "cpu"), cpu)
        for pack in (pack_gptq, pack_awq, pack_compressed_tensors):
            a, b = pack(cpu), pack(gpu)
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("in_", [256, 200])  # whole groups, a ragged last group
def test_fake_quantize_on_cuda_is_dequantize_of_quantize(in_):
    """AWQ's short-way fake quantization on CUDA: the quantizer's own dequantized codes there, and the CPU's values."""
    w = torch.randn(64, in_) * 0.05
    for sym in (True, False):
        gpu = fake_quantize_rtn(w.cuda(), 4, 128, sym)
        assert torch.equal(gpu, dequantize(quantize_rtn(w.cuda(), 4, 128, sym)))
        assert torch.equal(gpu.cpu(), fake_quantize_rtn(w, 4, 128, sym))


def test_gptq_on_cuda_agrees_with_cpu():
    x = correlated_inputs(1024, 512, seed=1)
    w = torch.randn(256, 512) * 0.05
    H, _ = accumulate_hessian(None, 0, x)
    Hg, _ = accumulate_hessian(None, 0, x.cuda())
    cpu = gptq_quantize(w, H, 4, 64, symmetric=False, act_order=True)
    gpu = gptq_quantize(w.cuda(), Hg, 4, 64, symmetric=False, act_order=True)
    assert float((gpu.codes.cpu() == cpu.codes).float().mean()) > 0.98  # BLAS rounding differs
    assert torch.equal(gpu.g_idx.cpu(), cpu.g_idx)


@pytest.mark.parametrize("symmetric", [False, True])
def test_scale_refit_on_cuda_agrees_with_cpu(symmetric):
    """The same codes refit on the GPU (bmm in chunks, float64 solves) give the CPU's scales but for rounding, with
    a ragged last group and a row chunk smaller than the matrix (several chunks)."""
    import lorafast_export.quant.gptq as gptq

    x = correlated_inputs(2048, 200, seed=6)
    w = torch.randn(64, 200, generator=torch.Generator().manual_seed(7)) * 0.05
    H, _ = accumulate_hessian(None, 0, x)
    qt = gptq_quantize(w, H, 4, 32, symmetric=symmetric, static_groups=True, act_order=True)
    cpu = refit_scales(w, H, qt.codes, qt.scales, qt.zeros, 4, 32)
    budget = gptq.REFIT_CHUNK_ELEMENTS["cuda"]
    gptq.REFIT_CHUNK_ELEMENTS["cuda"] = 7 * 32 * 7 * 10  # 10 rows a chunk
    try:
        zeros = None if qt.zeros is None else qt.zeros.cuda()
        gpu = refit_scales(w.cuda(), H.cuda(), qt.codes.cuda(), qt.scales.cuda(), zeros, 4, 32)
    finally:
        gptq.REFIT_CHUNK_ELEMENTS["cuda"] = budget
    assert gpu.is_cuda and gpu.dtype == cpu.dtype
    assert not torch.equal(cpu, qt.scales)  # the refit changed something
    close = ((gpu.cpu().float() - cpu.float()).abs() <= 2e-3 * cpu.float().abs() + 1e-6).all(dim=1)
    assert int(close.sum()) >= 60  # of 64 rows: a near-tie in a row's keep-or-refit check may go either way


@pytest.mark.parametrize("symmetric", [False, True])
def test_range_search_on_cuda_agrees_with_cpu(symmetric):
    """quant.range_search (on by default for gptq / awq-gptq) on CUDA: the CPU's choice on nearly every row (the
    error sums may round differently, which can flip a near-tie), and never a larger weighted error."""
    w = torch.randn(512, 128) * 0.05
    hdiag = torch.rand(128) + 0.1
    cpu = search_qparams(w, 4, symmetric, torch.float16, 100, 0.8, col_weight=hdiag)
    gpu = search_qparams(w.cuda(), 4, symmetric, torch.float16, 100, 0.8, col_weight=hdiag.cuda())
    assert float((gpu[0].cpu() == cpu[0]).float().mean()) > 0.98

    def err(s, z):
        z = None if z is None else z.cpu()[:, None]
        fq = quantize_codes(w, s.cpu().float()[:, None], z, 4).float() - (8 if z is None else z.float())
        return float(((fq * s.cpu().float()[:, None] - w).pow(2) * hdiag).sum())

    assert err(*gpu) <= err(*cpu) * (1 + 1e-5)


def test_awq_and_qlinear_on_cuda():
    x = correlated_inputs(256, 256, seed=2, outlier_channels=4).cuda()
    w = (torch.randn(128, 256) * 0.05).cuda()
    s = awq_search_scale([w], x, 4, 64)
    clip = awq_search_clip(w * s, x / s, 4, 64)
    assert s.is_cuda and clip.shape == (128, 4) and torch.isfinite(clip).all()
    qt = quantize_rtn(w, 4, 64, False, bias=torch.randn(128, device="cuda"))
    layer = QLinear(qt)
    assert torch.allclose(layer(x), F.linear(x, dequantize(qt), qt.bias), atol=1e-4)
    assert layer(x.half()).dtype == torch.float16


@pytest.mark.parametrize(
    "out,in_,group_size,symmetric,act_order,static",
    [
        (300, 256, 128, True, False, False),
        (64, 200, 32, False, True, False),
        (50, 96, -1, False, False, False),
        (300, 256, 128, True, True, True),  # the default: act-order, static groups (params per column)
        (64, 200, 32, False, True, True),
        (40, 160, 64, False, False, True),
    ],
)
def test_triton_column_sweep_equals_the_torch_loop(
    monkeypatch, out, in_, group_size, symmetric, act_order, static
):
    from lorafast_export.quant import gptq

    if gptq._triton_sweep_kernel is None:
        pytest.skip("no triton")
    x = correlated_inputs(2048, in_, seed=4).cuda()
    w = (torch.randn(out, in_, generator=torch.Generator().manual_seed(5)) * 0.05).cuda()
    H, _ = accumulate_hessian(None, 0, x)
    fast = gptq_quantize(w, H, 4, group_size, symmetric, act_order=act_order, static_groups=static)
    assert gptq._triton_sweep_kernel is not None  # the kernel ran (a failed launch falls back and clears it)
    monkeypatch.setattr(gptq, "_triton_sweep_kernel", None)
    loop = gptq_quantize(w, H, 4, group_size, symmetric, act_order=act_order, static_groups=static)
    assert_same_qtensor(qtensor_to(fast, "cpu"), qtensor_to(loop, "cpu"))


@pytest.mark.parametrize("method", ["gptq", "awq", "awq-gptq"])  # gptq, awq-gptq: with the range search
def test_bf16_cuda_walk_is_as_accurate_as_the_cpu_walk(tmp_path, method):
    from lorafast_export.model.quantized import fake_quant_decoder
    from lorafast_export.quant.walk import quantize_checkpoint
    from tests.quant.pipeline_helpers import mean_kl, random_ids, tiny_checkpoint

    merged = tiny_checkpoint(tmp_path / "m", "llama", outliers=True)
    calib, held = random_ids(16, 64, seed=0), random_ids(4, 64, seed=1)
    kl = {}
    searched = {} if method == "awq" else {"range_search": True}  # its default at g128; g32 here
    for device in ("cpu", "cuda"):
        qm = quantize_checkpoint(
            merged,
            {"method": method, "group_size": 32, "device": device, **searched},
            calib_ids=calib,
        )
        kl[device] = mean_kl(merged, fake_quant_decoder(qm).cpu(), held)
    assert kl["cuda"] < 1.25 * kl["cpu"] + 1e-3, kl
