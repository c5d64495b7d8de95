"""A small ONNX graph writer: nodes, typed values, and initializers streamed to one external-data file.

Initializers are written to `<model>.onnx.data` as soon as they are made (each at a 64-byte aligned offset),
and the graph keeps only a reference to them, so lowering a model holds about one tensor in memory at a
time, never the whole model (DESIGN.md, "Streaming by layer").
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

INLINE_BYTES = 1024  # smaller initializers (shapes, constants, norms of toy models) stay inside the proto
ALIGN = 64


class ExternalData:
    """Appends raw tensor bytes to one file; returns TensorProtos that point at them."""

    def __init__(self, path: Path):
        self.path = path
        self._f = open(path, "wb")  # closed by close()
        self.offset = 0

    def tensor(self, name: str, array: np.ndarray) -> TensorProto:
        array = np.ascontiguousarray(array)
        if array.nbytes < INLINE_BYTES:
            return numpy_helper.from_array(array, name)
        pad = -self.offset % ALIGN
        self._f.write(b"\0" * pad)
        self.offset += pad
        t = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype), dims=array.shape)
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", self.path.name), ("offset", self.offset), ("length", array.nbytes)):
            t.external_data.add(key=k, value=str(v))
        self._f.write(array.tobytes())
        self.offset += array.nbytes
        return t

    def close(self) -> None:
        self._f.close()


class Graph:
    """Collects nodes/initializers/inputs/outputs; unique node names; `save()` writes model.onnx + data."""

    def __init__(self, path: Path, opset: int = 21):
        self.path = path
        self.data = ExternalData(path.with_name(path.name + ".data"))
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.opset = opset
        self._consts: dict[tuple, str] = {}
        self.op_count: dict[str, int] = {}

    def init(self, name: str, array: np.ndarray) -> str:
        self.inits.append(self.data.tensor(name, array))
        return name

    def const(self, value, dtype=np.int64) -> str:
        """A small shared constant (scalar or 1-D list) by value."""
        arr = np.array(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            self._consts[key] = self.init(f"const/{arr.dtype.name}/{len(self._consts)}", arr)
        return self._consts[key]

    def op(
        self,
        op_type: str,
        inputs: list[str],
        name: str,
        n_out: int = 1,
        domain: str = "",
        outputs: list[str] | None = None,
        **attrs,
    ) -> list[str]:
        """Add one node named `name`; its outputs are `outputs` or `name/output_i`. Returns them."""
        outs = outputs or [f"{name}/output_{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=name, domain=domain or None, **attrs))
        self.op_count[op_type] = self.op_count.get(op_type, 0) + 1
        return outs

    def op1(self, op_type: str, inputs: list[str], name: str, domain: str = "", **attrs) -> str:
        return self.op(op_type, inputs, name, 1, domain, **attrs)[0]

    def add_input(self, name: str, elem_type: int, shape: list) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def add_output(self, name: str, elem_type: int, shape: list) -> None:
        """Declare graph output `name` (a node must produce it under that name: op(..., outputs=[name]))."""
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, shape))

    def save(self) -> None:
        self.data.close()
        graph = helper.make_graph(self.nodes, "lorafast_export", self.inputs, self.outputs, self.inits)
        model = helper.make_model(
            graph,
            producer_name="lorafast-export",
            opset_imports=[helper.make_opsetid("", self.opset), helper.make_opsetid("com.microsoft", 1)],
        )
        model.ir_version = 10
        onnx.save(model, str(self.path))
