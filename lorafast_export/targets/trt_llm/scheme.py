"""What a QuantizedModel becomes in TensorRT-LLM (quant_algo), the target options, and every refusal at once.

Method → quant_algo (TensorRT-LLM's QuantAlgo names; ModelOpt's where ModelOpt has the scheme):
  none                              → no quantization (fp16/bf16 weights)
  int8, rtn bits=8 per-channel sym  → W8A16        int8 per-channel symmetric, weight-only
  awq / rtn / gptq 4-bit sym,       → W4A16_AWQ    int4 per-group symmetric, pre_quant_scale (ones: our AWQ
    group 64 or 128, no act-order                  scales are already folded into the previous op)
  smoothquant (W8A8), legacy only   → W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN: int8 per-channel weights, int8
                                       activations quantized per token at run time (amax/127): our scheme exactly
                                       (tensorrt_llm/quantization/mode.py: use_smooth_quant(per_token=True,
                                       per_channel=True); layers.py SmoothQuantLinear / SmoothQuantRowLinear)
Refused, with the reason and the fix:
  asymmetric codes   the W4A16_AWQ / W8A16 / SmoothQuant kernels take no zero point (ModelOpt writes
                     has_zero_point false; TensorRT-LLM's W4A16_AWQ linear passes zeros=None) → quant.symmetric: true
  act-order (g_idx)  the int4 group kernels need contiguous groups → quantize without act_order
  smoothquant in the PyTorch-backend bundle: tensorrt_llm/_torch/modules/linear.py `get_quant_method` has no
                     INT8 W8A8 linear (FP8, FP8 rowwise/block, NVFP4, W4A8 FP4, weight-only int8/int4, W4A16/W4A8
                     AWQ only; anything else raises "unsupported quant mode") → --trt-llm-legacy. ModelOpt's own
                     INT8 SmoothQuant export, W8A8_SQ_PER_CHANNEL, is a STATIC per-tensor activation scale: another
                     scheme than ours, so it is not what we write either.
  other group sizes  TensorRT-LLM's groupwise int4 GEMMs support group sizes 64 and 128
  ragged widths      the group must divide every reduced width: the MLP width is padded instead (mlp_width), any
                     other ragged width (hidden size, heads * head_dim) is refused
  quantized lm_head  ModelOpt and TensorRT-LLM keep lm_head unquantized (exclude_modules) → leave it fp
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lorafast_export.dtypes import TORCH_DTYPES
from lorafast_export.errors import InputError, UnsupportedError
from lorafast_export.model.quantized import q_info
from lorafast_export.model.spec import linear_module_names
from lorafast_export.qform import ACT_QUANT_INT8_PER_TOKEN

W8A16, W4A16_AWQ = "W8A16", "W4A16_AWQ"
W8A8_SQ = "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN"
INT4_GROUP_SIZES = (64, 128)
PADDED_MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")  # widths the writers pad (mlp_width)
DTYPES = {n: TORCH_DTYPES[n] for n in ("float16", "bfloat16")}  # TensorRT-LLM runs half precision

OPTIONS = {
    "legacy": "true: the TensorRT engine checkpoint (config.json + rank{i}.safetensors) and build.sh for "
    "trtllm-build (TensorRT-LLM <= 1.2); false (default): the HF-style bundle for the PyTorch backend",
    "tp": "tensor-parallel size (legacy: shards the checkpoint; both: --tp_size), default 1",
    "pp": "pipeline-parallel size (legacy: splits the layers; both: --pp_size), default 1",
    "max_batch_size": "largest batch the server schedules, default 64",
    "max_num_tokens": "largest number of batched tokens per step, default 8192",
    "max_seq_len": "longest request (prompt + output), default max_position_embeddings",
    "kv_cache_free_gpu_memory_fraction": "share of free GPU memory for the paged KV cache, default 0.9",
    "enable_block_reuse": "reuse KV-cache blocks across requests with a common prefix, default true",
    "cuda_graphs": "capture CUDA graphs for decoding (PyTorch backend), default true",
    "port": "port of trtllm-serve, default 8000",
}


@dataclass(frozen=True)
class TrtOptions:
    legacy: bool = False
    tp: int = 1
    pp: int = 1
    max_batch_size: int = 64
    max_num_tokens: int = 8192
    max_seq_len: int | None = None
    kv_cache_free_gpu_memory_fraction: float = 0.9
    enable_block_reuse: bool = True
    cuda_graphs: bool = True
    port: int = 8000

    @staticmethod
    def from_dict(opts: dict) -> TrtOptions:
        """recipe.target.options → TrtOptions; every bad key and value reported at once."""
        problems = [f"unknown option {k!r}" for k in opts if k not in OPTIONS]
        for k in ("legacy", "enable_block_reuse", "cuda_graphs"):
            if k in opts and not isinstance(opts[k], bool):
                problems.append(f"{k}={opts[k]!r}: use true or false")
        for k in ("tp", "pp", "max_batch_size", "max_num_tokens", "max_seq_len", "port"):
            v = opts.get(k)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                problems.append(f"{k}={v!r}: use a positive integer")
        frac = opts.get("kv_cache_free_gpu_memory_fraction", 0.9)
        if isinstance(frac, bool) or not isinstance(frac, int | float) or not 0 < frac <= 1:
            problems.append(f"kv_cache_free_gpu_memory_fraction={frac!r}: use a number in (0, 1]")
        if problems:
            known = "; ".join(f"{k}: {v}" for k, v in OPTIONS.items())
            raise InputError("target trt-llm: " + "; ".join(problems) + f". Options: {known}.")
        return TrtOptions(**{k: v for k, v in opts.items() if v is not None})


@dataclass(frozen=True)
class TrtScheme:
    """One quant_algo for the whole model (TensorRT-LLM checkpoints describe one scheme plus exclusions)."""

    quant_algo: str | None  # None (fp), W8A16, W4A16_AWQ, W8A8_SQ (legacy layout only)
    group_size: int | None = None  # W4A16_AWQ only
    method: str = "none"


def resolve_dtype(requested: str, merged_dtype: str) -> torch.dtype:
    """target.dtype → the bundle's dtype. TensorRT-LLM runs half precision; auto keeps a half model's dtype."""
    if requested == "auto":
        return DTYPES.get(merged_dtype, torch.float16)
    if requested not in DTYPES:
        raise InputError(
            f"target.dtype={requested!r}: TensorRT-LLM's fused attention and low-bit GEMMs run "
            "float16 or bfloat16; use dtype auto, float16 or bfloat16."
        )
    return DTYPES[requested]


def scheme_for(qm, legacy: bool = False) -> TrtScheme:
    """QuantizedModel (or None) → TrtScheme for the layout (legacy: engine checkpoint), or UnsupportedError listing
    every reason and fix."""
    if qm is None or not qm.q:
        return TrtScheme(None)
    method = str(qm.settings.get("method", "?"))
    qts = [i.scheme for i in q_info(qm.q).values()]  # from the headers: a spilled model's codes are not read
    problems = _model_problems(qm, qts, method) + _act_quant_problems(qts, method, legacy)
    kinds = {(qt.bits, qt.group_size, qt.symmetric, qt.act_quant) for qt in qts}
    if len(kinds) > 1:
        problems.append(
            f"layers use {len(kinds)} different schemes {sorted(kinds, key=str)}; a TensorRT-LLM "
            "checkpoint describes one quant_algo: quantize all layers alike"
        )
    bits, group_size = qts[0].bits, qts[0].group_size
    if bits == 8 and group_size != -1:
        problems.append(
            f"8-bit with group_size={group_size}: TensorRT-LLM's W8A16 is per output channel; "
            "use group_size -1 (the int8 method's default)"
        )
    if bits == 4 and group_size not in INT4_GROUP_SIZES:
        problems.append(
            f"4-bit with group_size={group_size}: TensorRT-LLM's W4A16 groupwise GEMMs take group "
            f"sizes {INT4_GROUP_SIZES}; re-quantize with --group-size 128 (or 64)"
        )
    problems += _shape_problems(qm, bits, group_size)
    if problems:
        raise UnsupportedError(
            f"cannot lower the {method} model to TensorRT-LLM:\n  - " + "\n  - ".join(problems)
        )
    if qts[0].act_quant == ACT_QUANT_INT8_PER_TOKEN:
        return TrtScheme(W8A8_SQ, None, method)
    if bits == 8:
        return TrtScheme(W8A16, None, method)
    return TrtScheme(W4A16_AWQ, group_size, method)


def _act_quant_problems(qts: list, method: str, legacy: bool) -> list[str]:
    """W8A8 (activations quantized at run time): only our per-token scheme, only in the engine checkpoint."""
    acts = {qt.act_quant for qt in qts} - {None}
    if not acts:
        return []
    if acts != {ACT_QUANT_INT8_PER_TOKEN}:
        return [
            f"activation quantization {sorted(acts)}: TensorRT-LLM's SmoothQuant takes int8 per-token "
            f"({ACT_QUANT_INT8_PER_TOKEN}) only"
        ]
    if not legacy:
        return [
            f"{method} quantizes activations (W8A8, int8 per token at run time), and TensorRT-LLM's PyTorch "
            "backend has no INT8 W8A8 linear: tensorrt_llm/_torch/modules/linear.py `get_quant_method` "
            "dispatches FP8, FP8 rowwise/block, NVFP4, W4A8 FP4, weight-only int8/int4 and W4A16/W4A8 AWQ, and "
            "raises 'unsupported quant mode' for W8A8_SQ_*. Use --trt-llm-legacy (recipe target.options.legacy: "
            f"true): the TensorRT engine checkpoint with quant_algo {W8A8_SQ} (trtllm-build, TensorRT-LLM "
            "<= 1.2), which is this scheme exactly. Or, for the PyTorch backend, --quant int8 (W8A16) or awq "
            "(W4A16). (ModelOpt's W8A8_SQ_PER_CHANNEL is not this scheme: a static per-tensor activation scale.)"
        ]
    if any(qt.bits != 8 for qt in qts):
        return [f"{method}: TensorRT-LLM's SmoothQuant GEMM takes int8 weights; quantize with bits 8"]
    return []


def _model_problems(qm, qts: list, method: str) -> list[str]:
    p = []
    if any(not qt.symmetric for qt in qts):
        p.append(
            "asymmetric codes (zero points): TensorRT-LLM's W4A16_AWQ, W8A16 and SmoothQuant kernels take no "
            "zero point (has_zero_point: false); re-quantize with quant.symmetric: true (--symmetric)"
        )
    if any(qt.act_order for qt in qts):
        p.append(
            "act-order (g_idx): the int4 group kernels need contiguous groups; quantize without act_order"
        )
    if "lm_head" in qm.q:
        p.append(
            "quantized lm_head: TensorRT-LLM checkpoints keep lm_head in fp (exclude_modules); "
            "set quant.quantize_lm_head: false"
        )
    missing = [m for i in range(qm.config.num_layers) for m in linear_module_names(i) if m not in qm.q]
    if missing:
        p.append(
            f"{len(missing)} decoder linear(s) left in fp (e.g. {missing[0]}): a TensorRT-LLM checkpoint "
            "quantizes every decoder linear with its one quant_algo; quantize them all"
        )
    return p


def _shape_problems(qm, bits: int, group_size: int) -> list[str]:
    """Widths the int4 kernels cannot take. The MLP width is exempt: the writers pad it (mlp_width)."""
    p = []
    for name, qt in q_info(qm.q).items():
        if name.endswith(PADDED_MLP):
            continue
        if bits == 4 and qt.out_features % 2:
            p.append(f"{name}: out_features={qt.out_features} is odd; int4 packs two output rows per byte")
        if bits == 4 and group_size > 0 and qt.in_features % group_size:
            p.append(f"{name}: in_features={qt.in_features} is not a multiple of group_size={group_size}")
    return p


def mlp_width(intermediate_size: int, scheme: TrtScheme, tp: int = 1) -> int:
    """The bundle's intermediate_size. W4A16_AWQ kernels need the group to divide every reduced width (and each
    row-parallel shard to hold whole groups), so a ragged MLP width is padded up to a multiple of group_size * tp:
    gate/up_proj gain output rows and down_proj input columns whose int4 values are 0. Those rows compute
    gate = up = 0, silu(0) * 0 = 0, and the columns multiply it by 0: the model is unchanged, exactly."""
    if scheme.quant_algo != W4A16_AWQ:
        return intermediate_size
    return -(-intermediate_size // (scheme.group_size * tp)) * scheme.group_size * tp


def legacy_problems(cfg, scheme: TrtScheme, tp: int, pp: int) -> list[str]:
    """What a tp x pp split of this model cannot do (heads, widths, groups per shard, layers per stage)."""
    p = []
    inter = mlp_width(cfg.intermediate_size, scheme, tp)  # W4A16_AWQ: padded to whole groups per shard
    dims = {
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "intermediate_size": inter,
    }
    p += [f"{k}={v} is not divisible by tp={tp}" for k, v in dims.items() if v % tp]
    if cfg.num_layers % pp:
        p.append(f"num_hidden_layers={cfg.num_layers} is not divisible by pp={pp}")
    if scheme.quant_algo == W4A16_AWQ:
        g = scheme.group_size
        rows = {
            "o_proj input (heads*head_dim/tp)": cfg.num_heads * cfg.head_dim // tp,
            "down_proj input (intermediate_size/tp)": inter // tp,
        }
        p += [
            f"{k}={v} is not a multiple of group_size={g}: row-parallel shards must hold whole groups; "
            f"use a smaller tp"
            for k, v in rows.items()
            if v % g
        ]
        cols = {
            "k/v_proj output per shard": cfg.num_kv_heads * cfg.head_dim // tp,
            "gate/up_proj output per shard": inter // tp,
        }
        p += [f"{k}={v} is odd: int4 packs two output rows per byte" for k, v in cols.items() if v % 2]
    if scheme.quant_algo == W8A8_SQ:
        p += _int8_gemm_problems(cfg, tp)
    return p


def _int8_gemm_problems(cfg, tp: int) -> list[str]:
    """The SmoothQuant GEMM (cutlass int8, cpp/tensorrt_llm/kernels/cutlass_kernels/int8_gemm/int8_gemm_template.h)
    loads 128-bit vectors: per shard, the reduced width K must be a multiple of 16 int8 values and the output width
    N a multiple of 8 half-precision values, or `can_implement` fails when the engine runs."""
    h, hd = cfg.hidden_size, cfg.head_dim
    k = {
        "hidden_size (q/k/v, gate/up input)": h,
        "o_proj input per shard": cfg.num_heads * hd // tp,
        "down_proj input per shard": cfg.intermediate_size // tp,
    }
    n = {
        "hidden_size (o_proj, down_proj output)": h,
        "fused qkv output per shard": (cfg.num_heads + 2 * cfg.num_kv_heads) * hd // tp,
        "gate/up_proj output per shard": cfg.intermediate_size // tp,
    }
    fix = "use a smaller tp" if tp > 1 else "use --quant int8 (W8A16) for this model"
    return [
        f"{name}={v} is not a multiple of 16: the int8 GEMM's reduced dimension must be; {fix}"
        for name, v in k.items()
        if v % 16
    ] + [
        f"{name}={v} is not a multiple of 8: the int8 GEMM's output width must be; {fix}"
        for name, v in n.items()
        if v % 8
    ]
