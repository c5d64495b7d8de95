"""Low-bit linears built from the quantized form's codes (repacked for a kernel, never requantized).

Kernels, chosen per layer by `choose_kernel` (bench/TORCH.md has the measurements behind "auto"):
- int4 on CUDA, shapes in the measured kernel table (runtime/int4_table.py): per batch bucket the fastest
  of tinygemm and our Triton kernels (runtime/triton_int4.py: GEMV/GEMM on qform's packed nibbles,
  GEMV_T/GEMM_T on a tiled repacking, GEMM_W/GEMV_W on an int32 word repacking) with the measured tile, or at
  1-8 rows our CUDA tensor-core kernel (runtime/cuda_int4.py, MMA, on an mma-fragment repacking; compiled by NVRTC
  when the layer loads, the GEMV where it cannot) (`Int4TritonLinear`); `kernel=triton` forces
  the Triton kernels wherever the scheme allows.
- int4 on CUDA (compute capability 8.0+), shapes or GPUs no table holds, groups of a multiple of 128 columns:
  GEMM_W at every row count with tiles by rule (`int4_table.untabled_plan`); tinygemm was 2-11x slower than it
  from 8 rows on (a batch, a prefill) on both GPUs we measured, and about as fast at one row.
- int4 elsewhere, group size 32/64/128/256: torch's tinygemm, `aten._weight_int4pack_mm` (CUDA, bf16
  activations; faster than bf16 at 1-4 rows, slower from 8 rows on) or `aten._weight_int4pack_mm_for_cpu`. Tinygemm computes w = (q - 8) * scale + zero with a float zero per
  group, so our integer zero point z becomes zero = (8 - z) * scale (0 when symmetric). Act-order columns
  are permuted into contiguous groups, and the activations with them.
- int8 with `kernel=triton` (per channel or power-of-two groups): our Triton GEMV/GEMM/GEMM_T on the uint8
  codes (runtime/triton_int8.py, `Int8TritonLinear`); auto picks them on CUDA for per-channel layers whose
  shape the measured int8 table (data/kernels/int8_<gpu>.json) shows faster than bf16 at every decode row
  count (up to 32 rows); prefills then run the table's fastest int8 entry, often DEQUANT (the codes
  dequantized per call, then cuBLAS), and pay for half of bf16's weight bytes there.
- int8 per channel, CPU, bf16/fp16 activations: `aten._weight_int8pack_mm` (w = int8 * scale per row) up to
  PACK_ROWS rows, the weight dequantized per call and torch's matmul beyond (the pack product is a GEMV per row:
  3.8-11.2x dense's time from 64 rows, against 1.1-2.0x). Codes are unsigned, so int8 = code - 128 and an asymmetric zero point
  adds a per-row term (128 - z) * scale * sum(x). Not for float32 activations (the pack product ran 2.6-3.7x
  the dense float32 matmul's time at one row and 37-48x at 256 on a 2-core CPU, bench/TORCH.md session 35):
  they keep the dense weight (`dequant`). Not on CUDA: there it ran 7x (1 row) to 90x (32 rows) slower than the
  dense bf16 matmul.
- anything else (int8 grouped, odd shapes, fp32 activations on CUDA int4): `DequantLinear`, the
  dequantized weight kept dense in the compute dtype: exact, no memory saving.
- SmoothQuant W8A8 (act_quant int8 per token, int8 per-channel symmetric weights) on the CPU and on CUDA
  (compute capability 8.0+), under auto: `W8A8Linear`, the activations' int8 codes times the weights' with
  exact int32 sums (on CUDA our Triton GEMV and GEMMs, runtime/triton_w8a8.py; on the CPU `torch._int_mm`,
  oneDNN's int8 GEMM), each token's scale and each channel's applied once to the float32 result (timed
  against bf16 and the earlier kernels in bench/TORCH.md, sessions 34 and 35). Elsewhere, and for the other kernels, a
  W8A8 layer quantize-dequantizes its activations per token first, exactly as qform.QLinear does, and the
  matmul is weight-only.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from lorafast_export.qform import (
    ACT_QUANT_INT8_PER_TOKEN,
    QTensor,
    act_order_perm,
    dequantize,
    fake_quant_int8_per_token,
    group_index,
    int8_per_token,
    pack_nibbles,
)
from lorafast_export.runtime.int4_table import (
    TINYGEMM_ENTRY,
    TRITON_GROUPS,
    default_plan,
    int8_plan_from_table,
    load_table,
    plan_from_table,
    untabled_plan,
)
from lorafast_export.runtime.tinygemm import INNER_K_TILES, tinygemm_mm, tinygemm_pack

log = logging.getLogger(__name__)
TINYGEMM_GROUPS = (32, 64, 128, 256)
KERNELS = ("auto", "dequant", "triton")


def _contiguous_groups(qt: QTensor) -> torch.Tensor | None:
    """Column permutation making groups contiguous and exactly group_size wide; None when already so."""
    if qt.g_idx is None:
        return None
    perm = act_order_perm(qt)
    groups = group_index(qt.in_features, qt.group_size, qt.g_idx)[perm]
    expected = torch.arange(qt.in_features, device=groups.device) // qt.group_size
    if not torch.equal(groups, expected):
        raise ValueError("act-order groups are not group_size wide")
    return perm


def _device_codes(qt: QTensor, device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(uint8 codes [out, in] on the device, act-order columns permuted into contiguous groups; the
    permutation on the device or None). The codes go to the device before any repacking, so every
    packing below runs there (on CUDA: no host pass over the codes, no int32 copy over PCIe)."""
    perm = _contiguous_groups(qt)
    codes = qt.codes.to(device=device, dtype=torch.uint8)
    if perm is None:
        return codes, None
    perm = perm.to(device)
    return codes[:, perm], perm


def _groups_contiguous(qt: QTensor) -> bool:
    try:
        _contiguous_groups(qt)
    except ValueError:
        return False
    return True


def tinygemm_fits(qt: QTensor, cuda: bool, dtype: torch.dtype) -> bool:
    """Whether torch's tinygemm takes this tensor: its packing wants out_features a multiple of 8 on CUDA and of
    16 on the CPU (`_convert_weight_to_int4pack_cpu` refuses 40 rows, say), CUDA bf16 activations."""
    out_f, in_f = qt.out_features, qt.in_features
    return (
        qt.group_size in TINYGEMM_GROUPS
        and in_f % qt.group_size == 0
        and in_f % (INNER_K_TILES * 16) == 0
        and out_f % (8 if cuda else 16) == 0
        and (not cuda or dtype == torch.bfloat16)
    )


def triton_plan(qt: QTensor, device: torch.device | str, dtype: torch.dtype, prefer: str) -> list[int] | None:
    """The Triton int4 plan for this tensor (None: another kernel). Auto: only from the measured table."""
    if qt.bits != 4 or qt.group_size not in TRITON_GROUPS or not _groups_contiguous(qt):
        return None
    if prefer == "triton":
        plan = _table_plan(qt, device, dtype)
        return default_plan() if plan is None else plan
    dev = torch.device(device)
    if dev.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return None
    return _table_plan(qt, dev, dtype)


def _table_plan(qt: QTensor, device, dtype: torch.dtype) -> list[int] | None:
    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        return None
    gpu = torch.cuda.get_device_name(dev)
    table = load_table(gpu)
    fits = tinygemm_fits(qt, True, dtype)
    choice = plan_from_table(table, qt.out_features, qt.in_features, allow_tinygemm=fits)
    if choice is not None:
        return choice[1] if choice[0] == "int4_triton" else None
    plan = _untabled_plan(qt, dev)
    if gpu not in _UNMEASURED:
        _UNMEASURED.add(gpu)
        log.warning(
            "%s: no measured int4 kernel for a [%d, %d] layer here, so the int4 layers this table lacks run %s, "
            "unfused; `lorafast-export tune-kernels --model ARTIFACT` measures them once (the tensor-core kernel "
            "at 1-8 rows and the fused decode ops run only from a measured table)",
            gpu,
            qt.out_features,
            qt.in_features,
            "our GEMM_W kernel with tiles chosen by rule" if plan else "tinygemm (or dequantized)",
        )
    return plan


def _untabled_plan(qt: QTensor, dev: torch.device) -> list[int] | None:
    """int4_table.untabled_plan for a layer no table holds, on a CUDA GPU of compute capability 8.0 or newer
    (bf16 tensor cores), when its groups are whole 128-column word tiles; else None (tinygemm, as before)."""
    if dev.type != "cuda" or qt.group_size % 128:
        return None
    props = torch.cuda.get_device_properties(dev)
    if (props.major, props.minor) < (8, 0):
        return None
    return untabled_plan(qt.out_features, qt.in_features, props.multi_processor_count)


_UNMEASURED: set[str] = set()  # GPUs whose missing table entries were logged (once a process)


def _per_channel(qt: QTensor) -> bool:
    """One scale per output channel: no groups, or one group as wide as the input."""
    return qt.group_size == -1 or qt.group_size >= qt.in_features


def _signed_codes(qt: QTensor, device) -> torch.Tensor:
    """8-bit codes as signed int8 [out, in] on the device: code - 128 (qform's unsigned grid, zero 128)."""
    return (qt.codes.to(device=device, dtype=torch.int16) - 128).to(torch.int8).contiguous()


def int8_triton_fits(qt: QTensor) -> bool:
    """Our Triton int8 kernels: per channel, or groups of a power of two >= 16, contiguous after act-order."""
    g = qt.group_size
    return qt.bits == 8 and (_per_channel(qt) or (g >= 16 and not g & (g - 1))) and _groups_contiguous(qt)


def int8_table_plan(qt: QTensor, device, dtype: torch.dtype) -> list[int] | None:
    """The measured int8 plan (auto on CUDA, bf16/fp16, per channel): None where the table does not say
    our kernels beat bf16 at every measured decode row count (runtime/int4_table.int8_plan_from_table)."""
    dev = torch.device(device)
    if dev.type != "cuda" or dtype not in (torch.bfloat16, torch.float16) or not _per_channel(qt):
        return None
    if qt.bits != 8 or not int8_triton_fits(qt) or not torch.cuda.is_available():
        return None
    table = load_table(torch.cuda.get_device_name(dev), 8)
    return int8_plan_from_table(table, qt.out_features, qt.in_features)


def w8a8_fits(qt: QTensor) -> bool:
    """W8A8Linear runs this tensor: int8 per-token activations, int8 per-channel symmetric weights, both
    widths a multiple of 8 (cuBLAS's int8 GEMM), and int32 sums that cannot overflow (127 * 128 * in)."""
    return (
        qt.bits == 8
        and qt.act_quant == ACT_QUANT_INT8_PER_TOKEN
        and _per_channel(qt)
        and qt.zeros is None
        and qt.in_features % 8 == 0
        and qt.out_features % 8 == 0
        and 127 * 128 * qt.in_features < 2**31
    )


def _int_mm_fast(device: torch.device) -> bool:
    """Where W8A8Linear was measured faster than the layer's other kernels and bf16 (bench/TORCH.md,
    session 34): the CPU (oneDNN's int8 GEMM) and CUDA GPUs with int8 tensor cores of compute capability 8.0+."""
    if device.type == "cpu":
        return True
    return (
        device.type == "cuda"
        and torch.cuda.is_available()
        and torch.cuda.get_device_capability(device) >= (8, 0)
    )


def choose_kernel(qt: QTensor, device: torch.device | str, dtype: torch.dtype, prefer: str = "auto") -> str:
    """'w8a8' | 'int4_triton' | 'int4_tinygemm' | 'int8_triton' | 'int8_weight_only' | 'dequant' for this
    tensor on this device/dtype. int8_triton with kernel=triton, or under auto where the measured int8 table
    says it beats bf16 at decode row counts (int8_table_plan); w8a8 under auto on the CPU and CUDA for the layers it fits."""
    if prefer == "dequant":
        return "dequant"
    cuda = torch.device(device).type == "cuda"
    if prefer == "auto" and w8a8_fits(qt) and _int_mm_fast(torch.device(device)):
        return "w8a8"
    if prefer != "triton" and qt.bits == 8 and _per_channel(qt) and not cuda and dtype != torch.float32:
        return "int8_weight_only"  # on CUDA (torch 2.11, H200) _weight_int8pack_mm was 7-90x slower than bf16
    if triton_plan(qt, device, dtype, prefer) is not None:
        return "int4_triton"
    if prefer == "triton" and int8_triton_fits(qt):
        return "int8_triton"
    if prefer == "auto" and int8_table_plan(qt, device, dtype) is not None:
        return "int8_triton"
    if qt.bits == 4 and tinygemm_fits(qt, cuda, dtype) and _groups_contiguous(qt):
        return "int4_tinygemm"
    return "dequant"


class _QuantLinearBase(nn.Module):
    def __init__(self, qt: QTensor, bias: torch.Tensor | None, dtype: torch.dtype, device):
        super().__init__()
        self.in_features, self.out_features = qt.in_features, qt.out_features
        self.act_quant = qt.act_quant
        b = qt.bias if qt.bias is not None else bias
        self.register_buffer("bias", None if b is None else b.to(device=device, dtype=dtype))

    def _prep(self, x: torch.Tensor) -> torch.Tensor:
        return fake_quant_int8_per_token(x) if self.act_quant == ACT_QUANT_INT8_PER_TOKEN else x

    def _finish(self, y: torch.Tensor, shape) -> torch.Tensor:
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)


class DequantLinear(_QuantLinearBase):
    """Fallback: the dequantized weight, dense in the compute dtype (equals qform.QLinear exactly)."""

    kernel = "dequant"

    def __init__(self, qt: QTensor, bias=None, dtype=torch.float32, device="cpu"):
        super().__init__(qt, bias, dtype, device)
        self.register_buffer("weight", dequantize(qt).to(device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self._prep(x), self.weight, self.bias)


class Int8Linear(_QuantLinearBase):
    """Per-channel int8 weight-only through aten._weight_int8pack_mm up to PACK_ROWS rows; beyond, the weight
    dequantized per call (int8 * scale in the activation dtype) and torch's matmul."""

    kernel = "int8_weight_only"
    # a 2-core CPU, bf16, [2048 | 8192, 2048] (session 35): pack 0.9 | 3.2 ms against dequantized 0.7 | 10.3 at
    # 16 rows, 3.4 | 12.8 against 0.9 | 11.6 at 64
    PACK_ROWS = 32

    def __init__(self, qt: QTensor, bias=None, dtype=torch.float32, device="cpu"):
        super().__init__(qt, bias, dtype, device)
        scale = qt.scales[:, 0].float()  # [out]
        self.register_buffer("weight", _signed_codes(qt, device))  # [out, in]
        self.register_buffer("scales", scale.to(device=device, dtype=dtype))
        zcorr = None if qt.zeros is None else (128.0 - qt.zeros[:, 0].float()) * scale  # [out]
        self.register_buffer("zero_term", None if zcorr is None else zcorr.to(device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, x = x.shape, self._prep(x).reshape(-1, self.in_features)
        if x.shape[0] <= self.PACK_ROWS:
            y = torch.ops.aten._weight_int8pack_mm(x, self.weight, self.scales)
        else:
            y = F.linear(x, self.weight.to(x.dtype) * self.scales[:, None])
        if self.zero_term is not None:
            y = (y.float() + x.float().sum(-1, keepdim=True) * self.zero_term).to(x.dtype)
        return self._finish(y, shape)


class W8A8Linear(_QuantLinearBase):
    """SmoothQuant W8A8: each token's int8 codes (qform.int8_per_token, as the fake-quant reference rounds
    them) times the int8 weights with int32 sums (exact), then the token's scale and the channel's in float32,
    once. On CUDA with triton, our kernels (runtime/triton_w8a8.py: a GEMV at one row, a GEMM with 16-row tiles
    and split K at 2-16 rows, larger tiles for prefills from 32; bench/TORCH.md, sessions 34 and 35) except at
    CUBLAS_ROWS. There, and on the CPU: `torch._int_mm` (cuBLAS's or oneDNN's int8 GEMM); on CUDA it takes more
    than 16 rows, so up to 16 get 16 zero rows appended and their outputs dropped (the weight is read once
    either way)."""

    kernel = "w8a8"
    # 17-31 rows: cuBLAS's int8 GEMM, no padding needed, beat our 16-row tiles at 24 rows on the 8B linears
    # (123.9 against 131.2 us summed, H100, session 35 call 7); from 32 our GEMM (session 34). Bounds compared,
    # not `in range(...)`: a compiled graph's row count is symbolic, which dynamo cannot test for membership
    CUBLAS_ROWS = (17, 32)

    def __init__(self, qt: QTensor, bias=None, dtype=torch.bfloat16, device="cpu"):
        super().__init__(qt, bias, dtype, device)
        if not w8a8_fits(qt):
            raise ValueError(f"W8A8Linear: [{qt.out_features}, {qt.in_features}] does not fit (w8a8_fits)")
        self.register_buffer("weight", _signed_codes(qt, device))  # [out, in]
        self.register_buffer("scales", qt.scales[:, 0].to(device=device, dtype=torch.float32))  # [out]
        self.pad = self.triton = torch.device(device).type == "cuda"
        if self.triton:
            try:
                from lorafast_export.runtime import triton_w8a8  # noqa: F401  (registers the op)
            except ImportError:  # no triton package: cuBLAS's int8 GEMM at every row count
                self.triton = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, x = x.shape, x.reshape(-1, self.in_features)
        codes, scale = int8_per_token(x)
        xq, rows = codes.to(torch.int8), x.shape[0]
        if self.triton and not self.CUBLAS_ROWS[0] <= rows < self.CUBLAS_ROWS[1]:
            y = torch.ops.lorafast.w8a8_mm(xq, self.weight, scale, self.scales, x.dtype)
            return self._finish(y, shape)
        small = self.pad and rows <= 16
        if small:
            xq = F.pad(xq, (0, 0, 0, 16))
        acc = torch._int_mm(xq, self.weight.t())
        if small:
            acc = acc[:rows]
        return self._finish((acc.float() * scale * self.scales).to(x.dtype), shape)


class Int4Linear(_QuantLinearBase):
    """int4 grouped through torch's tinygemm kernels (CUDA or CPU packing, chosen at build)."""

    kernel = "int4_tinygemm"

    def __init__(self, qt: QTensor, bias=None, dtype=torch.bfloat16, device="cpu"):
        super().__init__(qt, bias, dtype, device)
        self.group_size = qt.group_size
        codes, perm = _device_codes(qt, device)
        weight, sz = tinygemm_pack(qt, codes, dtype, device)
        self.register_buffer("scale_zeros", sz)
        self.register_buffer("perm", perm)
        self.register_buffer("weight", weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, x = x.shape, self._prep(x).reshape(-1, self.in_features)
        if self.perm is not None:
            x = x[:, self.perm]
        return self._finish(tinygemm_mm(x, self.weight, self.group_size, self.scale_zeros), shape)


class Int4TritonLinear(_QuantLinearBase):
    """int4 grouped through our Triton kernels (runtime/triton_int4.py): GEMV/GEMM on qform's packed
    nibbles, GEMV_T/GEMM_T on the tiled repacking, tinygemm for the row buckets the plan gives it. The
    layer keeps only the packings its plan uses (a plan mixing two keeps both: 1 byte per weight)."""

    kernel = "int4_triton"

    def __init__(self, qt: QTensor, bias=None, dtype=torch.bfloat16, device="cpu", plan=None):
        super().__init__(qt, bias, dtype, device)
        from lorafast_export.runtime import triton_int4 as t4  # registers the op; imports triton

        codes, perm = _device_codes(qt, device)  # every packing below runs on the device
        self.group_size = qt.group_size
        self.plan = list(plan or default_plan())
        tinygemm = tinygemm_fits(qt, torch.device(device).type == "cuda", dtype)
        if not tinygemm:
            self.plan = _tinygemm_to_gemv(self.plan, t4)  # e.g. CUDA tinygemm takes bf16 only
        if qt.group_size % t4.WORD_COLS:
            self.plan = _words_to_tiled(self.plan, t4)  # GEMM_W's 128-column tiles need whole groups
        self.plan = _bounded_tail(
            _mma_to_gemv(self.plan, t4, qt, dtype, device),
            t4,
            tinygemm,
            _untabled_plan(qt, torch.device(device)),
        )
        kinds = set(self.plan[1 :: t4.ENTRY])
        qform = pack_nibbles(codes) if kinds & {t4.GEMV, t4.GEMM} else None
        tiled = t4.pack_tiles(codes, qt.group_size) if kinds & {t4.GEMV_T, t4.GEMM_T} else None
        self.register_buffer("weight", qform)  # [out, ceil(in/2)]
        self.register_buffer("weight_tiled", tiled)  # [out, ceil(in/T) * T/2]
        fuse_words, fuse_sz = _fused_int4_packings(qt, perm)
        words = t4.pack_words(codes) if kinds & set(t4.WORD_KINDS) or fuse_words else None
        self.register_buffer("weight_words", words)  # int32 [out, ceil(in/128) * 16]
        frags = None
        if t4.MMA in kinds:
            from lorafast_export.runtime.cuda_int4 import pack_frags

            frags = pack_frags(codes, qt.group_size)
        self.register_buffer("weight_frags", frags)  # int32, the mma fragment order (runtime/cuda_int4.py)
        entries = [self.plan[i : i + t4.ENTRY] for i in range(0, len(self.plan), t4.ENTRY)]
        sz = fuse_sz or any(
            e[1] == t4.GEMM_W and e[3] & 32 for e in entries
        )  # scales + zero points, one int32
        scales, zeros = qt.scales.to(device), None if qt.zeros is None else qt.zeros.to(device)
        sz = t4.pack_scale_zero(scales, zeros) if sz else None  # None for fp32 scales: bit ignored
        self.register_buffer("scale_zero_words", sz)  # int32 [groups, out]
        self.register_buffer("scales", scales)  # [out, groups], stored dtype
        self.register_buffer("zeros", zeros)
        self.register_buffer("perm", perm)
        tg_w, tg_sz = tinygemm_pack(qt, codes, dtype, device) if t4.TINYGEMM in kinds else (None, None)
        self.register_buffer("tinygemm_weight", tg_w)
        self.register_buffer("tinygemm_scale_zeros", tg_sz)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, x = x.shape, self._prep(x).reshape(-1, self.in_features)
        if self.perm is not None:
            x = x[:, self.perm]
        y = torch.ops.lorafast.int4_mm(
            x,
            self.weight,
            self.scales,
            self.zeros,
            self.in_features,
            self.group_size,
            self.plan,
            self.tinygemm_weight,
            self.tinygemm_scale_zeros,
            self.weight_tiled,
            self.weight_words,
            self.scale_zero_words,
            self.weight_frags,
        )
        return self._finish(y, shape)


def _fused_int4_packings(qt: QTensor, perm: torch.Tensor | None) -> tuple[bool, bool]:
    """(the word layout, the scale/zero words) a fused decode kernel (runtime/triton_fused_int4.py) needs for
    this tensor: only where its measured table has a tile for the shape (the layer then keeps the words, 0.5
    byte a weight, even if its plan runs tinygemm) and the kernel can read it (groups of whole 128-column
    tiles, no act-order permutation)."""
    if perm is not None or qt.group_size % 128:
        return False, False
    from lorafast_export.runtime.triton_fused_int4 import wants_words

    return wants_words(qt.out_features, qt.in_features)


class Int8TritonLinear(_QuantLinearBase):
    """int8 weight-only through our Triton GEMV/GEMM (runtime/triton_int8.py) on qform's uint8 codes."""

    kernel = "int8_triton"

    def __init__(self, qt: QTensor, bias=None, dtype=torch.bfloat16, device="cpu", plan=None):
        super().__init__(qt, bias, dtype, device)
        from lorafast_export.runtime import triton_int8  # noqa: F401  (registers the op; imports triton)

        codes, perm = _device_codes(qt, device)
        self.register_buffer("weight", codes.contiguous())  # [out, in]
        self.register_buffer("scales", qt.scales.to(device))  # [out, groups], stored dtype
        self.register_buffer("zeros", None if qt.zeros is None else qt.zeros.to(device))
        self.register_buffer("perm", perm)
        self.group_size = qt.group_size
        self.plan = list(plan or default_plan())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, x = x.shape, self._prep(x).reshape(-1, self.in_features)
        if self.perm is not None:
            x = x[:, self.perm]
        y = torch.ops.lorafast.int8_mm(x, self.weight, self.scales, self.zeros, self.group_size, self.plan)
        return self._finish(y, shape)


def _to_gemv(plan: list[int], t4, drop) -> list[int]:
    """The plan with each entry for which drop(entry) holds replaced by the default GEMV tile for its rows."""
    gemv = default_plan()[1 : t4.ENTRY]
    entries = [plan[i : i + t4.ENTRY] for i in range(0, len(plan), t4.ENTRY)]
    return [x for e in entries for x in ([e[0], *gemv] if drop(e) else e)]


def _tinygemm_to_gemv(plan: list[int], t4) -> list[int]:
    """The plan with each tinygemm entry (rows, TINYGEMM, ...) replaced by the default GEMV tile for those
    rows: for a layer tinygemm cannot run (its shape, or a non-bf16 dtype on CUDA)."""
    return _to_gemv(plan, t4, lambda e: e[1] == t4.TINYGEMM)


def _mma_to_gemv(plan: list[int], t4, qt: QTensor, dtype: torch.dtype, device) -> list[int]:
    """The plan with each MMA entry the CUDA kernel cannot run for this layer (its K, group, dtype or device:
    runtime/cuda_int4.py `fits`; or the kernel does not compile here: logged once per reason) replaced by the
    default GEMV tile for those rows. Compiles the layer's variant now, at load, not in a decode step."""
    from lorafast_export.runtime import cuda_int4

    n, k, gs = qt.out_features, qt.in_features, qt.group_size
    cuda = torch.device(device).type == "cuda"

    def ok(e: list[int]) -> bool:
        ksb, rpw, minb, bits = cuda_int4.layout(e)
        if not (
            cuda and e[0] <= cuda_int4.MAX_ROWS and cuda_int4.fits(n, k, gs, e[0], ksb, dtype, rpw, minb)
        ):
            return False
        if bits & cuda_int4.SUBX and e[0] != 1:  # a one-row variant in an entry for more rows
            return False
        why = cuda_int4.unready(
            gs, ksb, rpw, qt.zeros is not None, qt.scales.dtype, dtype, minb, bits, torch.device(device).index
        )
        if why and why not in _MMA_WARNED:
            _MMA_WARNED.add(why)
            log.warning("int4 MMA kernel unavailable, the Triton GEMV runs instead: %s", why)
        return why is None

    return _to_gemv(plan, t4, lambda e: e[1] == t4.MMA and not ok(e))


_MMA_WARNED: set[str] = set()


def _bounded_tail(plan: list[int], t4, tinygemm: bool, untabled: list[int] | None = None) -> list[int]:
    """Rows beyond the plan's last bucket run its last entry (triton_int4.pick). The MMA kernel takes at most
    MAX_ROWS rows, so a plan that ends on an MMA entry (a table measured only up to 8 rows) gets, for every
    larger row count (a prefill's chunk, a big batch), what a GPU without a table runs: `untabled` (the layer's
    int4_table.untabled_plan, GEMM_W by rule) where given, else tinygemm where the layer fits it (`tinygemm`),
    else the default GEMM tile. A table measured at few rows then changes only the row counts it measured."""
    if plan[-t4.ENTRY + 1] != t4.MMA:
        return plan
    if untabled:
        return [*plan, *untabled]
    tail = [1 << 30, *TINYGEMM_ENTRY] if tinygemm else default_plan()[-t4.ENTRY :]
    return [*plan, *tail]


def _words_to_tiled(plan: list[int], t4) -> list[int]:
    """The plan with each GEMM_W entry run by GEMM_T with the same tile (nibbles by PTX, scale per tile or
    per weight as the entry says) and each GEMV_W entry by the default GEMV: for a layer whose groups are
    narrower than the word layout's 128 columns."""
    gemv = default_plan()[1 : t4.ENTRY]
    entries = [plan[i : i + t4.ENTRY] for i in range(0, len(plan), t4.ENTRY)]
    entries = [[e[0], *gemv] if e[1] == t4.GEMV_W else e for e in entries]
    return [
        x
        for e in entries
        for x in ([*e[:1], t4.GEMM_T, e[2], 64 | e[3] & 15, *e[4:]] if e[1] == t4.GEMM_W else e)
    ]


_KERNEL_CLASSES = {
    "w8a8": W8A8Linear,
    "int8_triton": Int8TritonLinear,
    "int4_tinygemm": Int4Linear,
    "int8_weight_only": Int8Linear,
    "dequant": DequantLinear,
}


def lower_qtensor(
    qt: QTensor, device, dtype: torch.dtype, prefer: str = "auto", bias: torch.Tensor | None = None
) -> nn.Module:
    """The runtime linear for one QTensor: the fastest kernel that supports it (see module doc)."""
    kernel = choose_kernel(qt, device, dtype, prefer)
    if kernel == "int4_triton":
        plan = triton_plan(qt, device, dtype, prefer)
        return Int4TritonLinear(qt, bias=bias, dtype=dtype, device=device, plan=plan)
    if kernel == "int8_triton":
        plan = int8_table_plan(qt, device, dtype) if prefer == "auto" else None
        return Int8TritonLinear(qt, bias=bias, dtype=dtype, device=device, plan=plan)
    return _KERNEL_CLASSES[kernel](qt, bias=bias, dtype=dtype, device=device)
