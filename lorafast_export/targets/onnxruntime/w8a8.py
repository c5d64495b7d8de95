"""SmoothQuant W8A8 in onnxruntime's integer ops: per-token int8 activations × int8 per-channel weights.

    x_q = clip(round(x / s_x), -127, 127),  s_x = max(max|x| / 127, 1e-8) per token   (qform.fake_quant_int8_per_token)
    y   = s_x * s_w * Σ_k x_q[k] (code[k] - 128)                                        (int32 accumulation)

MatMulInteger takes both operands as uint8 with zero point 128: the weight codes exactly as the QTensor holds
them, the activation codes shifted by 128. The integer product is exact, so this matches the fake-quant
reference up to float rounding, except where a 1-ulp difference upstream moves round(x / s_x) by one code.
(DynamicQuantizeLinear + MatMulIntegerToFloat would quantize per tensor and asymmetric: not our scheme.)
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from lorafast_export.errors import UnsupportedError
from lorafast_export.qform import ACT_QUANT_INT8_PER_TOKEN, QTensor
from lorafast_export.targets.onnxruntime.graph import Graph


def check_w8a8(qt: QTensor, module: str) -> None:
    if (
        qt.act_quant != ACT_QUANT_INT8_PER_TOKEN
        or qt.bits != 8
        or qt.group_size != -1
        or qt.zeros is not None
    ):
        raise UnsupportedError(
            f"{module}: act_quant={qt.act_quant!r} with bits={qt.bits}, group_size={qt.group_size}, "
            f"symmetric={qt.symmetric}: the onnxruntime target lowers activation quantization only as 8-bit "
            "symmetric per-channel weights with int8 per-token activations (what method smoothquant makes)."
        )


def quantize_tokens(g: Graph, x: str, name: str) -> tuple[str, str]:
    """x float32 [..., in] → (uint8 codes + 128 [..., in], scale s_x float32 [..., 1])."""
    f32 = np.float32
    absmax = g.op1(
        "ReduceMax", [g.op1("Abs", [x], f"{name}/Abs"), g.const([-1])], f"{name}/ReduceMax", keepdims=1
    )
    s_x = g.op1(
        "Max",
        [g.op1("Div", [absmax, g.const(127.0, f32)], f"{name}/DivMax"), g.const(1e-8, f32)],
        f"{name}/ScaleX",
    )
    xq = g.op1(
        "Clip",
        [
            g.op1("Round", [g.op1("Div", [x, s_x], f"{name}/DivX")], f"{name}/Round"),
            g.const(-127.0, f32),
            g.const(127.0, f32),
        ],
        f"{name}/Clip",
    )
    xu = g.op1(
        "Cast",
        [g.op1("Add", [xq, g.const(128.0, f32)], f"{name}/Shift")],
        f"{name}/ToU8",
        to=TensorProto.UINT8,
    )
    return xu, s_x


def int8_matmul(g: Graph, xu: str, s_x: str, module: str, qt: QTensor, name: str) -> str:
    """(xu, s_x) from quantize_tokens × the QTensor's codes → float32 [..., out] (no bias)."""
    codes = g.init(f"{module}.qweight", qt.codes.numpy().T.copy())  # uint8 [in, out], zero point 128
    zp = g.const(128, np.uint8)
    acc = g.op1("MatMulInteger", [xu, codes, zp, zp], f"{name}/MatMulInteger")  # int32 [..., out]
    s_w = g.init(f"{module}.scales", qt.scales[:, 0].float().numpy())  # [out]
    y = g.op1("Mul", [g.op1("Cast", [acc], f"{name}/AccF", to=TensorProto.FLOAT), s_x], f"{name}/MulX")
    return g.op1("Mul", [y, s_w], f"{name}/MulW")
