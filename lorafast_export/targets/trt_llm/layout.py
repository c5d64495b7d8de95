"""What a bundle directory holds, as data: tensor names → [dtype, shape] per safetensors file, and its configs.

Used to compare our bundles with NVIDIA ModelOpt's exports (bench/trtllm_vs_modelopt.py writes ModelOpt's layouts as
tests/targets/golden/*.json; tests/targets/test_trtllm.py checks ours against them), plus the one documented
difference: SmoothQuant. ModelOpt exports INT8 SmoothQuant only as W8A8_SQ_PER_CHANNEL, TensorRT-LLM's
out-of-the-box Int8SmoothQuantLinear (static per-tensor activation scale); our legacy bundle is
W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN, TensorRT-LLM's SmoothQuantLinear / SmoothQuantRowLinear / SmoothQuantRmsNorm
(tensorrt_llm/quantization/layers.py), whose parameters are what TensorRT-LLM's own converter writes
(tensorrt_llm/models/llama/convert.py get_tllm_linear_sq_weight, per_token=True, per_channel=True).
`modelopt_sq_as_ours` maps ModelOpt's layout onto ours, tensor by tensor, so the two can be compared exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

from lorafast_export.targets.trt_llm.scheme import W8A8_SQ

CONFIG_FILES = ("config.json", "hf_quant_config.json")
COLUMN_LINEARS = ("attention.qkv", "mlp.fc", "mlp.gate")  # split along the output (column-parallel)
ROW_LINEARS = ("attention.dense", "mlp.proj")  # split along the input (row-parallel)


def layout(d: Path) -> dict:
    """names → [dtype, shape] per safetensors file, and the json configs, of one exported directory."""
    from safetensors import safe_open

    tensors = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        with safe_open(str(f), "pt") as s:
            tensors[f.name] = {
                k: [str(s.get_slice(k).get_dtype()), list(s.get_slice(k).get_shape())]
                for k in sorted(s.keys())
            }
    configs = {n: json.loads((Path(d) / n).read_text()) for n in CONFIG_FILES if (Path(d) / n).exists()}
    return {"tensors": tensors, "configs": configs}


def flat_config(config: dict, ignored: tuple[str, ...] = ()) -> dict:
    """Nested config → {"a.b.c": value}, without keys of which any part is in `ignored` (e.g. producer, rank)."""

    def walk(d: dict, prefix: str) -> dict:
        out = {}
        for k, v in d.items():
            out.update(walk(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}": v})
        return out

    return {k: v for k, v in walk(config, "").items() if not set(k.split(".")) & set(ignored)}


def modelopt_sq_as_ours(ref: dict) -> dict:
    """ModelOpt's W8A8_SQ_PER_CHANNEL engine-checkpoint layout → the layout our per-token bundle must have.

    Per quantized linear (ModelOpt → ours):
      weight I8 [out_r, in_r]                    → weight I8 [out_r, in_r]          (same)
      weights_scaling_factor F32 [out_r]         → per_channel_scale F32 [1, out_r] (same values' role; the plugin
                                                   layer declares Parameter(shape=(1, out)))
      activation_scaling_factor F32 [1]          → dropped: static per-tensor activation scale; ours is per token,
                                                   computed at run time
      prequant_scaling_factor F16 [in_r]         → dropped: ModelOpt multiplies the input by it; our smoothing is
                                                   folded into the norms (and up_proj rows) already
      (row-parallel dense / proj only)           → smoother F32 [1, in_r]: SmoothQuantRowLinear divides its input
                                                   by it; ones here
    Per decoder layer: input_layernorm / post_layernorm gain scale_to_int F32 [1] (SmoothQuantRmsNorm's parameter:
    unused with per-token scaling, but TensorRT-LLM's loader requires every parameter). Config: quant_algo becomes
    W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN. Everything else is unchanged.
    """
    tensors = {}
    for f, names in ref["tensors"].items():
        out: dict = {}
        for name, (dtype, shape) in names.items():
            module, _, leaf = name.rpartition(".")
            if leaf == "weights_scaling_factor":
                out[f"{module}.per_channel_scale"] = ["F32", [1, *shape]]
            elif leaf in ("activation_scaling_factor", "prequant_scaling_factor"):
                if leaf == "prequant_scaling_factor" and module.endswith(ROW_LINEARS):
                    out[f"{module}.smoother"] = ["F32", [1, *shape]]
            else:
                out[name] = [dtype, shape]
                if module.endswith(("input_layernorm", "post_layernorm")) and leaf == "weight":
                    out[f"{module}.scale_to_int"] = ["F32", [1]]
        tensors[f] = dict(sorted(out.items()))
    configs = json.loads(json.dumps(ref["configs"]))
    if "config.json" in configs:
        configs["config.json"]["quantization"]["quant_algo"] = W8A8_SQ
    return {"tensors": tensors, "configs": configs}
