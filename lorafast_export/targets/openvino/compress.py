"""Put QTensor codes into the IR as OpenVINO compressed weights, and read them back.

Each quantized MatMul's f32 weight Constant (traced from ExportLinear) is replaced by

    symmetric:  Constant i4|i8 [out, G, gs] (= codes - 2**(bits-1)) → Convert f32
    asymmetric: Constant u4|u8 [out, G, gs] → Convert f32 → Subtract(Constant u4|u8 zero [out, G, 1] → Convert f32)
    then:       → Multiply(scale [out, G, 1]: f16 Constant → Convert f32, or f32 Constant) → Reshape [out, G*gs]
                → MatMul(transpose_b)

the decompression pattern the CPU plugin folds into its compressed FullyConnected (per-channel: no group axis, no
Reshape). The codes are ours, bit for bit: nothing is requantized. The arithmetic runs in f32, as in qform's
dequantize, so the dequantized weight equals the fake-quant reference's exactly. Under act-order the columns are
sorted by group (ExportLinear gathers the activations the same way), so groups are contiguous. When group_size
does not divide in_features, the last group is padded with codes equal to its zero point (dequantized: 0) and
ExportLinear pads the activations with zeros, so the weight still reshapes to [out, n_groups, group_size].
"""

from __future__ import annotations

import numpy as np
import torch

from lorafast_export.errors import UnsupportedError
from lorafast_export.qform import QTensor, act_order_perm, group_index, zero_points

_SIGNED = {4: "i4", 8: "i8"}
_UNSIGNED = {4: "u4", 8: "u8"}


def padded_columns(qt: QTensor) -> int:
    """Zero columns appended so that grouped codes reshape to [out, n_groups, group_size] (ragged last group)."""
    return 0 if qt.n_groups == 1 else (-qt.in_features) % qt.group_size


def contiguous_codes(path: str, qt: QTensor) -> torch.Tensor:
    """codes [out, in + pad]: columns sorted by group, the last group padded with codes that dequantize to 0."""
    codes = qt.codes
    if qt.g_idx is not None and qt.n_groups > 1:
        perm = act_order_perm(qt)
        codes = codes[:, perm]
        g_sorted = group_index(qt.in_features, qt.group_size, qt.g_idx)[perm]
        if not torch.equal(g_sorted, torch.arange(qt.in_features) // qt.group_size):
            raise UnsupportedError(
                f"{path}: its act-order g_idx puts a number of columns other than group_size={qt.group_size} in "
                "some group; OpenVINO's grouped weight decompression needs equal groups. Quantize it with GPTQ's "
                "standard act-order (g_idx = rank // group_size) or without act-order."
            )
    pad = padded_columns(qt)
    if pad:  # pad with the last group's zero point (2**(bits-1) if symmetric): (code - zero) * scale = 0
        fill = zero_points(qt)[:, -1:].expand(-1, pad)
        codes = torch.cat([codes, fill], dim=1)
    return codes


def compressed_weight(path: str, qt: QTensor):
    """The decompression subgraph (an ov Output, f32 [out, in + pad]) for one QTensor."""
    import openvino as ov
    from openvino import opset13 as ops

    codes = contiguous_codes(path, qt)
    out, width = codes.shape
    grouped = qt.n_groups > 1
    shape = (out, qt.n_groups, width // qt.n_groups) if grouped else (out, width)
    if qt.zeros is None:
        signed = (codes.numpy().astype(np.int16) - 2 ** (qt.bits - 1)).astype(np.int8)
        w = ops.convert(
            ops.constant(
                signed.reshape(shape), dtype=getattr(ov.Type, _SIGNED[qt.bits]), name=f"{path}.weight"
            ),
            ov.Type.f32,
        )
    else:
        w = ops.convert(
            ops.constant(
                codes.numpy().reshape(shape),
                dtype=getattr(ov.Type, _UNSIGNED[qt.bits]),
                name=f"{path}.weight",
            ),
            ov.Type.f32,
        )
        zero = qt.zeros.numpy().reshape(out, -1, 1) if grouped else qt.zeros.numpy()  # [out, G, 1] | [out, 1]
        zero = ops.convert(
            ops.constant(zero, dtype=getattr(ov.Type, _UNSIGNED[qt.bits]), name=f"{path}.weight/zero_point"),
            ov.Type.f32,
        )
        w = ops.subtract(w, zero, name=f"{path}.weight/zero_point/subtract")
    w = ops.multiply(w, _scale_constant(path, qt.scales, grouped), name=f"{path}.weight/scaled")
    if grouped:
        w = ops.reshape(w, ops.constant(np.array([out, width], dtype=np.int64)), special_zero=False)
    return w.output(0)


def _scale_constant(path: str, scales: torch.Tensor, grouped: bool):
    import openvino as ov
    from openvino import opset13 as ops

    s = scales.reshape(scales.shape[0], -1, 1) if grouped else scales  # [out, G, 1] | [out, 1]
    if s.dtype == torch.float16:  # stored as is; Convert f32 is exact
        return ops.convert(
            ops.constant(s.numpy(), dtype=ov.Type.f16, name=f"{path}.weight/scale"), ov.Type.f32
        )
    return ops.constant(
        s.float().numpy(), dtype=ov.Type.f32, name=f"{path}.weight/scale"
    )  # bf16 → f32: exact


def compress_weights(om, qtensors: dict[str, QTensor], constant_name) -> int:
    """Swap each quantized linear's f32 weight Constant (found by `constant_name(path)`) for its codes."""
    consts = {n.get_friendly_name(): n for n in om.get_ops() if n.get_type_name() == "Constant"}
    for path, qt in qtensors.items():
        node = consts.get(constant_name(path))
        if node is None or list(node.get_output_shape(0)) != [
            qt.out_features,
            qt.in_features + padded_columns(qt),
        ]:
            raise RuntimeError(f"internal: weight constant of {path} not found in the converted model")
        new = compressed_weight(path, qt)
        for target in node.output(0).get_target_inputs():
            target.replace_source_output(new)
    om.validate_nodes_and_infer_types()
    return len(qtensors)


def read_compressed(om, path: str) -> dict[str, np.ndarray]:
    """The stored integer values of one compressed weight, unpacked: {'codes' [out, ...], 'zero_point', 'scale'}."""
    found = {}
    for n in om.get_ops():
        name = n.get_friendly_name()
        if n.get_type_name() == "Constant" and name.startswith(f"{path}.weight"):
            found[name.removeprefix(f"{path}.weight").lstrip("/") or "codes"] = _constant_values(n)
    return found


def _constant_values(node) -> np.ndarray:
    if node.get_element_type().bitwidth == 4:
        packed = np.asarray(node.get_data()).view(np.uint8)
        nib = np.stack([packed & 0xF, packed >> 4], axis=-1).reshape(-1)[: int(np.prod(node.shape))]
        if node.get_element_type().is_signed():
            nib = np.where(nib >= 8, nib.astype(np.int16) - 16, nib).astype(np.int8)
        return nib.reshape(list(node.shape))
    return np.asarray(node.get_data()).copy()
