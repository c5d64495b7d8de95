"""Low-bit runtime linears equal the fake-quant (dequantized) matmul within float tolerance."""

import pytest
import torch

from lorafast_export.errors import InputError
from lorafast_export.qform import QLinear
from lorafast_export.runtime.linear import choose_kernel, lower_qtensor
from lorafast_export.runtime.loader import check_kernel
from lorafast_export.runtime.options import RuntimeOptions
from tests.quant.helpers import random_qtensor

CASES = [  # bits, group, symmetric, act_order, kernel
    (4, 128, True, False, "int4_tinygemm"),
    (4, 32, False, False, "int4_tinygemm"),
    (4, 64, False, True, "int4_tinygemm"),
    (8, -1, True, False, "int8_weight_only"),
    (8, -1, False, False, "int8_weight_only"),
    (8, 128, True, False, "dequant"),
    (4, -1, True, False, "dequant"),
]

# An int4 g128 layer of a shape no table holds, lowered for CUDA bf16: our GEMM_W rule on a CUDA GPU of compute
# capability 8.0 or newer (linear._untabled_plan), tinygemm where no such GPU is visible (no table is read).
UNTABLED_G128 = (
    "int4_triton"
    if torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)
    else "int4_tinygemm"
)


@pytest.mark.parametrize("bits,group,sym,act_order,kernel", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_runtime_linear_matches_fake_quant(bits, group, sym, act_order, kernel, dtype):
    qt = random_qtensor(48, 256, bits, group, sym, act_order=act_order, bias=True)
    x = torch.randn(2, 5, 256)
    ref = QLinear(qt)(x.double().float())  # fp32 reference
    mod = lower_qtensor(qt, "cpu", dtype)
    assert mod.kernel == kernel
    out = mod(x.to(dtype)).float()
    assert out.shape == ref.shape
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # relative to the output scale
    assert (out - ref).abs().max() <= tol * ref.abs().max()


def test_kernel_choice_falls_back_to_dequant():
    qt = random_qtensor(48, 96, 4, 32, True)  # in_features not a multiple of 128
    assert choose_kernel(qt, "cpu", torch.float32) == "dequant"
    assert (
        choose_kernel(random_qtensor(48, 256, 4, 128, True), "cpu", torch.float32, prefer="dequant")
        == "dequant"
    )
    assert (
        choose_kernel(random_qtensor(48, 256, 4, 128, True), "cuda", torch.float32) == "dequant"
    )  # tinygemm: bf16
    assert choose_kernel(random_qtensor(48, 256, 4, 128, True), "cuda", torch.bfloat16) == UNTABLED_G128
    assert (
        choose_kernel(random_qtensor(48, 256, 8, -1, True), "cuda", torch.bfloat16) == "dequant"
    )  # measured slow


@pytest.mark.parametrize("out_f", [40, 1000])
def test_rows_tinygemm_cannot_pack_on_the_cpu_take_another_kernel(out_f):
    """torch's CPU tinygemm packing wants a multiple of 16 output rows (CUDA's: 8): 40 or 1,000 rows (a small
    vocabulary's quantized lm_head) lower to another kernel instead of failing at load, and compute the product."""
    qt = random_qtensor(out_f, 256, 4, 128, True)
    mod = lower_qtensor(qt, "cpu", torch.float32)
    assert mod.kernel != "int4_tinygemm"
    x = torch.randn(3, 256)
    ref = QLinear(qt)(x)
    assert (mod(x) - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert (
        choose_kernel(qt, "cuda", torch.bfloat16) == UNTABLED_G128
    )  # both multiples of 8 (tinygemm's CUDA rule)


def test_triton_kernels_are_refused_off_cuda():
    with pytest.raises(InputError, match="kernel='triton' needs a CUDA device"):
        check_kernel(RuntimeOptions(kernel="triton"), torch.device("cpu"))
    check_kernel(RuntimeOptions(kernel="auto"), torch.device("cpu"))  # auto: no error, the measured choice


@pytest.mark.parametrize("sym,act_order", [(False, False), (True, True)])
def test_qtensors_read_onto_the_device_lower_to_the_same_linear(tmp_path, sym, act_order):
    """open_qtensors(files, device) (the runtime loader: packed codes moved, then unpacked and repacked on the
    device) gives the QTensors of a host read, and their runtime linears hold the same buffers bit for bit."""
    from lorafast_export.model.quantized import open_qtensors
    from lorafast_export.qform import load_qtensors, save_qtensors

    qt = random_qtensor(48, 256, 4, 64, sym, act_order=act_order, bias=True)
    save_qtensors(tmp_path / "q.safetensors", {"m": qt})
    host = load_qtensors(tmp_path / "q.safetensors")["m"]
    moved = open_qtensors([tmp_path / "q.safetensors"], "cpu")["m"]
    for field in ("codes", "scales", "zeros", "g_idx", "bias"):
        a, b = getattr(host, field), getattr(moved, field)
        assert (a is None and b is None) or torch.equal(a, b), field
    a, b = lower_qtensor(host, "cpu", torch.bfloat16), lower_qtensor(moved, "cpu", torch.bfloat16)
    assert a.kernel == b.kernel == "int4_tinygemm"
    bufs = dict(b.named_buffers())
    assert all(torch.equal(t, bufs[n]) for n, t in a.named_buffers())
