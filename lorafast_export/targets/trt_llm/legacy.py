"""The legacy bundle: a TensorRT-LLM checkpoint (config.json + rank{i}.safetensors) for `trtllm-build`.

Layout as ModelOpt's export_tensorrt_llm_checkpoint writes it (checked against it: bench/TRTLLM.md):

    transformer.vocab_embedding.weight        [V/tp, H]        first pipeline stage; rows padded (AWQ: to 64)
    transformer.layers.{j}.input_layernorm / post_layernorm .weight             j = layer index inside the stage
    transformer.layers.{j}.attention.qkv      column-parallel: per rank [q_r; k_r; v_r] of the split q, k, v
    transformer.layers.{j}.attention.dense    row-parallel (o_proj): split along the input
    transformer.layers.{j}.mlp.fc / mlp.gate  column-parallel: gate_proj / up_proj
    transformer.layers.{j}.mlp.proj           row-parallel: down_proj
    transformer.ln_f.weight, lm_head.weight   last pipeline stage; lm_head split along the vocabulary
  per quantized linear: weight (int8; W4A16_AWQ: two int4 per byte along the output, [out/2, in]),
  weights_scaling_factor (float32: W8A16 [out], W4A16_AWQ [out, in/group]; row-parallel W8A16 scales are
  replicated, W4A16_AWQ scales split with their input groups) and, for W4A16_AWQ, prequant_scaling_factor [in]
  (ones: our scales are folded already). Column biases are split, row biases replicated (added once).
  W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN (SmoothQuant; ModelOpt exports only the static-scale W8A8_SQ_PER_CHANNEL,
  so these are TensorRT-LLM's own converter's names, tensorrt_llm/models/llama/convert.py get_tllm_linear_sq_weight
  with per_token and per_channel, and the parameters of quantization/layers.py SmoothQuantLinear /
  SmoothQuantRowLinear / SmoothQuantRmsNorm; trt/layout.py maps ModelOpt's layout onto this one):
    {qkv, fc, gate}.weight int8 [out/tp, in], .per_channel_scale float32 [1, out/tp]   w = int8 · scale[o]
    {dense, proj}.weight int8 [out, in/tp], .per_channel_scale float32 [1, out] (replicated),
      .smoother float32 [1, in/tp]: the layer divides its input by it before quantizing; ones (ours is folded)
    {input_layernorm, post_layernorm}.scale_to_int float32 [1] = 1: SmoothQuantRmsNorm's per-tensor scale, unused
      with per-token scaling but required by the loader (TensorRT-LLM's converter writes 1.0 too)
  Activations are quantized per token at run time by the fused RMSNorm and quantize_per_token plugins.
Rank i = pp_rank * tp + tp_rank.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from lorafast_export.model.spec import EMBED, FINAL_NORM, LM_HEAD, layer_prefix
from lorafast_export.targets.trt_llm.hf_bundle import (
    PRODUCER,
    copy_tokenizer,
    dtype_name,
    quant_section,
    write_meta,
    write_readme,
    write_script,
)
from lorafast_export.targets.trt_llm.pack import pack_int4_rows, pad_rows, round_up, split_dim
from lorafast_export.targets.trt_llm.scheme import W4A16_AWQ, W8A8_SQ, W8A16, TrtOptions
from lorafast_export.targets.trt_llm.weights import Linear, Weights

AWQ_VOCAB_MULTIPLE = 64  # ModelOpt pads vocab_embedding and lm_head of AWQ exports to a multiple of 64
COLUMN = {"attention.qkv": ("q_proj", "k_proj", "v_proj"), "mlp.fc": ("gate_proj",), "mlp.gate": ("up_proj",)}
ROW = {"attention.dense": "o_proj", "mlp.proj": "down_proj"}


def padded_vocab(vocab_size: int, quant_algo: str | None) -> int:
    """The config's vocab_size: ModelOpt pads it (to 64) for AWQ only; tp padding is per shard, not in config."""
    return round_up(vocab_size, AWQ_VOCAB_MULTIPLE) if quant_algo == W4A16_AWQ else vocab_size


def shard_column(lin: Linear, tp: int, r: int) -> Linear:
    scale = None if lin.scale is None else split_dim(lin.scale, tp, 0)[r]
    bias = None if lin.bias is None else split_dim(lin.bias, tp, 0)[r]
    return Linear(split_dim(lin.weight, tp, 0)[r], scale, bias)


def shard_row(lin: Linear, tp: int, r: int) -> Linear:
    scale = lin.scale  # W8A16: per output channel, replicated
    if scale is not None and scale.dim() == 2:  # W4A16_AWQ: whole input groups go with their columns
        scale = split_dim(scale, tp, 1)[r]
    return Linear(split_dim(lin.weight, tp, 1)[r], scale, lin.bias)


def cat_rows(parts: list[Linear]) -> Linear:
    def cat(ts):
        return None if ts[0] is None else torch.cat(ts, dim=0)

    return Linear(cat([p.weight for p in parts]), cat([p.scale for p in parts]), cat([p.bias for p in parts]))


def linear_tensors(
    lin: Linear, quant_algo: str | None, dtype: torch.dtype, row: bool = False
) -> dict[str, torch.Tensor]:
    """One (sharded) linear under the engine checkpoint's names (row: a row-parallel dense / proj)."""
    if quant_algo == W4A16_AWQ:
        out = {
            "weight": pack_int4_rows(lin.weight).view(torch.int8),
            "weights_scaling_factor": lin.scale,
            "prequant_scaling_factor": torch.ones(lin.weight.shape[1], dtype=dtype),
        }
    elif quant_algo == W8A16:
        out = {"weight": lin.weight, "weights_scaling_factor": lin.scale}
    elif quant_algo == W8A8_SQ:
        out = {"weight": lin.weight, "per_channel_scale": lin.scale.reshape(1, -1)}
        if row:  # ones: our smoothing factors are folded into the norms and up_proj rows already
            out["smoother"] = torch.ones(1, lin.weight.shape[1], dtype=torch.float32)
    else:
        out = {"weight": lin.weight}
    if lin.bias is not None:
        out["bias"] = lin.bias
    return out


def layer_tensors(w: Weights, i: int, j: int, tp: int, r: int) -> dict[str, torch.Tensor]:
    """Decoder layer i (global) as layer j of its pipeline stage, tensor-parallel rank r."""
    src, dst = layer_prefix(i), f"transformer.layers.{j}."
    algo = w.scheme.quant_algo
    out = {
        f"{dst}input_layernorm.weight": w.fp(f"{src}input_layernorm.weight"),
        f"{dst}post_layernorm.weight": w.fp(f"{src}post_attention_layernorm.weight"),
    }
    if algo == W8A8_SQ:
        out.update(
            {
                f"{dst}{n}.scale_to_int": torch.ones(1, dtype=torch.float32)
                for n in ("input_layernorm", "post_layernorm")
            }
        )
    for name, projs in COLUMN.items():
        block = "self_attn" if name.startswith("attention") else "mlp"
        lin = cat_rows([shard_column(w.linear(f"{src}{block}.{p}"), tp, r) for p in projs])
        out.update({f"{dst}{name}.{k}": v for k, v in linear_tensors(lin, algo, w.dtype).items()})
    for name, proj in ROW.items():
        block = "self_attn" if name.startswith("attention") else "mlp"
        lin = shard_row(w.linear(f"{src}{block}.{proj}"), tp, r)
        out.update({f"{dst}{name}.{k}": v for k, v in linear_tensors(lin, algo, w.dtype, row=True).items()})
    return out


def vocab_shard(t: torch.Tensor, vocab: int, tp: int, r: int) -> torch.Tensor:
    """Embedding / lm_head rows padded to the config vocab, then to a multiple of tp; shard r."""
    return split_dim(pad_rows(pad_rows(t, vocab), round_up(vocab, tp)), tp, 0)[r]


def rank_tensors(
    w: Weights, opts: TrtOptions, vocab: int, tp_rank: int, pp_rank: int
) -> dict[str, torch.Tensor]:
    per_stage = w.cfg.num_layers // opts.pp
    out: dict[str, torch.Tensor] = {}
    if pp_rank == 0:
        out["transformer.vocab_embedding.weight"] = vocab_shard(w.fp(EMBED), vocab, opts.tp, tp_rank)
    for j in range(per_stage):
        out.update(layer_tensors(w, pp_rank * per_stage + j, j, opts.tp, tp_rank))
    if pp_rank == opts.pp - 1:
        out["transformer.ln_f.weight"] = w.fp(FINAL_NORM)
        out["lm_head.weight"] = vocab_shard(w.fp(LM_HEAD), vocab, opts.tp, tp_rank)
    return {k: v.contiguous() for k, v in out.items()}


def rotary_scaling(cfg) -> dict | None:
    r = cfg.rope
    if r.type == "linear":
        return {"type": "linear", "factor": r.factor}
    if r.type == "llama3":
        return {
            "type": "llama3",
            "factor": r.factor,
            "low_freq_factor": r.low_freq_factor,
            "high_freq_factor": r.high_freq_factor,
            "original_max_position_embeddings": r.original_max_position_embeddings,
        }
    return None


def legacy_config(w: Weights, opts: TrtOptions, vocab: int) -> dict:
    """config.json with ModelOpt's keys (its manual path, without TensorRT-LLM installed) plus what it drops."""
    cfg, dt = w.cfg, dtype_name(w.dtype)
    config = {
        "producer": dict(PRODUCER),
        "architecture": (cfg.raw.get("architectures") or ["LlamaForCausalLM"])[0],
        "dtype": dt,
        "logits_dtype": "float16" if dt == "bfloat16" else dt,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "hidden_size": cfg.hidden_size,
        "norm_epsilon": cfg.rms_norm_eps,
        "vocab_size": vocab,
        "max_position_embeddings": cfg.max_position_embeddings,
        "hidden_act": "silu",
        "use_parallel_embedding": True,
        "embedding_sharding_dim": 0,
        "head_size": cfg.head_dim,
        "intermediate_size": w.mlp_width,  # padded to whole int4 groups per shard if ragged (scheme.mlp_width)
        "position_embedding_type": "rope_gpt_neox",
        "share_embedding_table": False,
        "residual_mlp": False,
        "bias": cfg.o_bias,
        "rotary_pct": 1.0,
        "rank": 0,
        "decoder": "qwen" if cfg.family == "qwen2" else "llama",
        "rmsnorm": True,
        "lm_head_bias": False,
        # not in ModelOpt 0.47's manual path: it reads rope_theta, which transformers 5 configs no longer have
        "rotary_base": cfg.rope.theta,
        "attn_bias": cfg.qkv_bias,
        "mlp_bias": cfg.mlp_bias,
    }
    if (scaling := rotary_scaling(cfg)) is not None:
        config["rotary_scaling"] = scaling
    if cfg.family == "qwen2":
        config["qwen_type"] = "qwen2"
    config["mapping"] = {"world_size": opts.tp * opts.pp, "tp_size": opts.tp, "pp_size": opts.pp}
    config["quantization"] = quant_section(w.scheme, ["lm_head"])
    return config


def write_legacy(w: Weights, merged_dir: Path, out: Path, opts: TrtOptions) -> dict:
    """Write the engine checkpoint into out (which exists), one rank file at a time; returns manifest facts."""
    vocab = padded_vocab(w.cfg.vocab_size, w.scheme.quant_algo)
    files = []
    for pp_rank in range(opts.pp):
        for tp_rank in range(opts.tp):
            rank = pp_rank * opts.tp + tp_rank
            save_file(
                rank_tensors(w, opts, vocab, tp_rank, pp_rank),
                str(out / f"rank{rank}.safetensors"),
                metadata={"format": "pt"},
            )
            files.append(f"rank{rank}.safetensors")
    (out / "config.json").write_text(json.dumps(legacy_config(w, opts, vocab), indent=4) + "\n")
    hf_config = json.loads((merged_dir / "config.json").read_text())
    hf_config["intermediate_size"] = w.mlp_width  # the model these ranks hold (padded MLP, same function)
    copy_tokenizer(merged_dir, out)
    write_script(out / "build.sh", build_script(opts, w))
    write_meta(out, "legacy", w, opts, w.cfg.vocab_size, hf_config=hf_config)
    write_readme(
        out,
        f"TensorRT engine checkpoint, tp={opts.tp} pp={opts.pp}",
        w,
        "Build engines with `./build.sh [engine_dir]` (trtllm-build, TensorRT-LLM <= 1.2), then serve them "
        "with `trtllm-serve engine_dir --backend tensorrt --tokenizer .`.",
    )
    return {"layout": "legacy (trtllm-build checkpoint)", "files": files, "vocab_size_padded": vocab}


def build_script(opts: TrtOptions, w: Weights) -> str:
    max_seq_len = opts.max_seq_len or w.cfg.max_position_embeddings
    note = _plugin_note(w.scheme.quant_algo)
    return f"""#!/usr/bin/env bash
# Build TensorRT engines from this TensorRT-LLM checkpoint (TensorRT-LLM <= 1.2, which has the TensorRT backend).
# tp={opts.tp} pp={opts.pp}: needs {opts.tp * opts.pp} GPU(s) to run. Serve the result with
#   trtllm-serve "$out" --backend tensorrt --tokenizer "$here"
{note}set -euo pipefail
here="$(cd "$(dirname "${{BASH_SOURCE[0]}}")" && pwd)"
out="${{1:-$here/engine}}"
trtllm-build --checkpoint_dir "$here" --output_dir "$out" \\
  --gpt_attention_plugin auto --gemm_plugin auto \\
  --paged_kv_cache enable --context_fmha enable --remove_input_padding enable \\
  --max_batch_size {opts.max_batch_size} --max_seq_len {max_seq_len} --max_num_tokens {opts.max_num_tokens} "${{@:2}}"
"""


def _plugin_note(quant_algo: str | None) -> str:
    """build.sh comment: which quantization plugins trtllm-build enables by itself (builder.py, from config.json)."""
    if quant_algo is None:
        return ""
    if quant_algo == W8A8_SQ:
        return (
            "# W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN: trtllm-build turns on the SmoothQuant plugins (int8 GEMM,\n"
            "# RMSNorm + per-token quantization, quantize_per_token) itself from config.json's quant_algo, since\n"
            "# its smooth_quant_plugins option defaults to enabled (leave it so); --gemm_plugin covers the fp GEMMs.\n"
            "# SmoothQuant engines need a GPU of compute capability 7.0-9.0 (e.g. A100, L40S, H100, H200):\n"
            "# builder.py refuses SmoothQuant on SM >= 100 and the int8 GEMM dispatches SM 70-90 only.\n"
        )
    plugin = {
        W4A16_AWQ: "weight_only_groupwise_quant_matmul_plugin",
        W8A16: "weight_only_quant_matmul_plugin",
    }
    return (
        f"# {quant_algo}: trtllm-build turns on {plugin[quant_algo]} itself from\n"
        "# config.json's quantization (it is not a command-line flag); --gemm_plugin covers the fp GEMMs.\n"
    )
