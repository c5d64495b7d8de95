"""Low-bit runtime linears equal the fake-quant (dequantized) matmul within float tolerance."""

import pytest
import torch

from lorafast_export.errors import InputError
from lorafast_export.qform import ACT_QUANT_INT8_PER_TOKEN, QLinear, with_fields
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
    if kernel == "int8_weight_only" and dtype == torch.float32:
        kernel = "dequant"  # the pack product is slower than the dense float32 matmul at every row count
    assert mod.kernel == kernel
    out = mod(x.to(dtype)).float()
    assert out.shape == ref.shape
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # relative to the output scale
    assert (out - ref).abs().max() <= tol * ref.abs().max()


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_int8_weight_only_past_pack_rows_dequantizes_per_call(sym, dtype):
    """Int8Linear: the pack product up to PACK_ROWS rows, the weight dequantized per call beyond; both equal
    the fake-quant product within the activation dtype's rounding, the zero point's term included."""
    qt = random_qtensor(48, 256, 8, -1, sym, bias=True, seed=5)
    mod = lower_qtensor(qt, "cpu", dtype)
    assert mod.kernel == "int8_weight_only"
    for rows in (mod.PACK_ROWS, mod.PACK_ROWS + 1, 100):
        x = torch.randn(rows, 256)
        ref = QLinear(qt)(x.to(dtype).float())
        out = mod(x.to(dtype)).float()
        assert (out - ref).abs().max() <= 2e-2 * ref.abs().max(), rows


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
    if not torch.cuda.is_available():  # W8A8: the int8 GEMM on a CUDA GPU only where one is visible
        assert choose_kernel(w8a8_qtensor(), "cuda", torch.bfloat16) == "dequant"


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


def w8a8_qtensor(out=48, in_=256, group=-1, symmetric=True):
    """A SmoothQuant layer's QTensor: int8 per-channel symmetric weights, int8 per-token activations."""
    qt = random_qtensor(out, in_, 8, group, symmetric, bias=True)
    return with_fields(qt, act_quant=ACT_QUANT_INT8_PER_TOKEN)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 5, 17, 40])
def test_w8a8_linear_matches_fake_quant(device, dtype, rows):
    """SmoothQuant layers run the int8 GEMM under auto (W8A8Linear: each token's int8 codes times the int8
    weights, int32 sums) and compute the fake-quant reference's product on the same input: in float32 to
    float32 rounding, in bf16 to the output's rounding. Negative scales, a bias, rows below and above the 16
    rows that cuBLAS's int8 GEMM needs (padded on CUDA)."""
    qt = w8a8_qtensor()
    x = torch.randn(rows, 256) * 3
    x[0, 7] = 40.0  # an outlier sets its token's scale
    mod = lower_qtensor(qt, device, dtype)
    assert mod.kernel == "w8a8"
    ref = QLinear(qt)(x.to(dtype).float())
    out = mod(x.to(device=device, dtype=dtype)).float().cpu()
    tol = 1e-6 if dtype == torch.float32 else 8e-3  # relative to the output scale
    assert (out - ref).abs().max() <= tol * ref.abs().max()


def test_w8a8_padding_changes_no_bit():
    """On CUDA W8A8Linear appends 16 zero rows (cuBLAS's int8 GEMM takes more than 16) and drops their
    outputs: the same product bit for bit, shown with the CPU's int8 GEMM."""
    mod = lower_qtensor(w8a8_qtensor(), "cpu", torch.float32)
    x = torch.randn(3, 256)
    plain = mod(x)
    mod.pad = True
    assert torch.equal(mod(x), plain)


@pytest.mark.parametrize(
    "qt",
    [
        w8a8_qtensor(symmetric=False),  # a zero point: not the symmetric int8 GEMM
        w8a8_qtensor(in_=252),  # cuBLAS's int8 GEMM wants widths that are multiples of 8
        w8a8_qtensor(group=128),  # grouped scales
    ],
    ids=["asymmetric", "width", "grouped"],
)
def test_w8a8_layers_it_cannot_run_take_another_kernel(qt):
    mod = lower_qtensor(qt, "cpu", torch.float32)
    assert mod.kernel != "w8a8"
    x = torch.randn(3, qt.in_features)
    ref = QLinear(qt)(x)
    assert (mod(x) - ref).abs().max() <= 1e-5 * ref.abs().max()
