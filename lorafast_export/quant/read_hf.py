"""Read a quantized HF checkpoint we wrote (GPTQ / AWQ / compressed-tensors) back into the quantized form.

Used to validate `--target hf` artifacts whose loader is not installed here (transformers needs GPTQModel for
GPTQ/AWQ): the artifact stage then runs our unpacking of the files on disk through the canonical decoder, which
checks the written codes, scales, zero points and fp tensors, though not a third-party kernel.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from lorafast_export.errors import InputError
from lorafast_export.model.quantized import QuantizedModel
from lorafast_export.model.spec import LM_HEAD, ModelConfig, linear_module_names
from lorafast_export.quant import formats
from lorafast_export.weights import WeightStore, _weight_files

FP_LINEAR_PARTS = {"weight", "bias"}  # all an unquantized linear stores; every quantized format stores more


def _unpack(qcfg: dict, tensors: dict):
    method = qcfg.get("quant_method")
    if method == "gptq":
        return formats.unpack_gptq(
            tensors, qcfg["bits"], qcfg["group_size"], qcfg["sym"], qcfg.get("checkpoint_format", "gptq")
        )
    if method == "awq":
        return formats.unpack_awq(tensors, qcfg["group_size"], qcfg["bits"])
    if method == "compressed-tensors":
        group = qcfg["config_groups"]["group_0"]
        return formats.unpack_compressed_tensors(
            tensors, formats.scheme_from_config_group(group), group["format"]
        )
    raise InputError(f"quantization_config.quant_method={method!r} is not one this reader knows.")


def read_quantized_checkpoint(model_dir: str | Path, lazy: bool = False) -> QuantizedModel:
    """lazy: `q` and `fp` read (and unpack) one entry from disk at each lookup, so a consumer walking them layer
    by layer (validation) holds one layer's codes at a time."""
    d = Path(model_dir)
    raw = json.loads((d / "config.json").read_text())
    qcfg = raw.get("quantization_config")
    if not isinstance(qcfg, dict):
        raise InputError(f"{d}/config.json: no quantization_config; not a quantized checkpoint.")
    cfg = ModelConfig.from_dict(raw, str(d / "config.json"))
    store = WeightStore(_weight_files(d, False))
    modules = [m for i in range(cfg.num_layers) for m in linear_module_names(i)] + [
        LM_HEAD.removesuffix(".weight")
    ]
    keys = store.keys()
    q_parts, used = {}, set()
    for m in modules:
        parts = {k.removeprefix(m + "."): k for k in keys if k.startswith(m + ".")}  # suffix → key
        if parts.keys() <= FP_LINEAR_PARTS:
            continue  # absent, or an unquantized linear: stays in fp
        q_parts[m] = parts
        used.update(parts.values())

    def unpack(m: str):
        return _unpack(qcfg, {suffix: store.get(k) for suffix, k in q_parts[m].items()})

    fp_names = [k for k in keys if k not in used]
    if lazy:
        from lorafast_export.model.quantized import LazyTensors

        q = _LazyMap(list(q_parts), unpack)
        fp = LazyTensors(store, fp_names)
    else:
        q = {m: unpack(m) for m in q_parts}
        fp = {k: store.get(k) for k in fp_names}
    return QuantizedModel(cfg, fp, q, {"read_from": str(d), "format": qcfg.get("quant_method")})


class _LazyMap(Mapping):
    """name → value computed at each lookup (nothing cached)."""

    def __init__(self, names: list[str], get):
        self._names, self._get = dict.fromkeys(names), get

    def __getitem__(self, name: str):
        if name not in self._names:
            raise KeyError(name)
        return self._get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._names

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)
