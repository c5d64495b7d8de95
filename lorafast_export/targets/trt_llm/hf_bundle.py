"""The default bundle: an HF-style checkpoint in ModelOpt's unified format, which TensorRT-LLM's PyTorch backend loads.

model/
  config.json                 the merged model's config, dtype set, + quantization_config (ModelOpt's flat shape)
  hf_quant_config.json        ModelOpt's {"producer", "quantization": {quant_algo, group_size, ...}}
  model*.safetensors          HF tensor names; per quantized linear `weight`, `weight_scale`
                              (+ `pre_quant_scale` on o_proj/down_proj for W4A16_AWQ), as ModelOpt names them
  tokenizer files, generation_config.json
  extra_llm_api_options.yaml  LLM-API options: paged KV cache with block reuse, TRTLLM attention, CUDA graphs
  serve.sh                    trtllm-serve with those options
  lorafast_trtllm.json        what this directory is (read by our reader, never guessed from file names)
  README.md                   what was verified here and what needs a GPU with TensorRT-LLM
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from lorafast_export import __version__
from lorafast_export.checkpoint import ShardWriter
from lorafast_export.model.spec import ATTN_PROJ, MLP_PROJ, layer_prefix
from lorafast_export.targets.trt_llm.pack import pack_int4_rows
from lorafast_export.targets.trt_llm.scheme import W4A16_AWQ, W8A8_SQ, TrtOptions, TrtScheme
from lorafast_export.targets.trt_llm.weights import Weights
from lorafast_export.weights import TOKENIZER_FILES

META_FILE = "lorafast_trtllm.json"
META_FORMAT, META_VERSION = "lorafast-trtllm", 1
PRODUCER = {"name": "lorafast-export", "version": __version__}
PQS_MODULES = ("self_attn.o_proj", "mlp.down_proj")  # where ModelOpt leaves pre_quant_scale (not foldable)
EXCLUDE = ["lm_head", "model.embed_tokens"]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def quant_section(scheme: TrtScheme, exclude: list[str]) -> dict:
    """The inner `quantization` dict ModelOpt writes for this quant_algo (key order as ModelOpt's)."""
    q: dict = {"quant_algo": scheme.quant_algo, "kv_cache_quant_algo": None}
    if scheme.quant_algo == W4A16_AWQ:
        q.update(group_size=scheme.group_size, has_zero_point=False, pre_quant_scale=True)
    if scheme.quant_algo is not None:
        q["exclude_modules"] = list(exclude)
    return q


def hf_quant_configs(scheme: TrtScheme) -> tuple[dict, dict]:
    """(config.json quantization_config, hf_quant_config.json) as ModelOpt 0.47 writes them."""
    inline = {
        "ignore": list(EXCLUDE),
        "quant_algo": scheme.quant_algo,
        "producer": dict(PRODUCER),
        "quant_method": "modelopt",
    }
    return inline, {"producer": dict(PRODUCER), "quantization": quant_section(scheme, EXCLUDE)}


def linear_tensors(w: Weights, module: str) -> dict[str, torch.Tensor]:
    """One linear's tensors under ModelOpt's unified-HF names (relative to the module path)."""
    lin = w.linear(module)
    if lin.scale is None:
        out = {"weight": lin.weight}
    elif w.scheme.quant_algo == W4A16_AWQ:
        out = {"weight": pack_int4_rows(lin.weight), "weight_scale": lin.scale}
        if module.endswith(PQS_MODULES):  # ones: our smoothing scales are already folded into the previous op
            out["pre_quant_scale"] = torch.ones(lin.weight.shape[1], dtype=w.dtype)
    else:
        out = {"weight": lin.weight, "weight_scale": lin.scale}
    if lin.bias is not None:
        out["bias"] = lin.bias
    return out


def write_hf_bundle(w: Weights, merged_dir: Path, out: Path, opts: TrtOptions) -> dict:
    """Write the bundle into out (which exists); returns facts for the manifest."""
    writer = ShardWriter(out)
    quantized = set() if w.qm is None else set(w.qm.q)
    for name in w.fp_names():
        writer.add({name: w.fp(name)})
    for i in range(w.cfg.num_layers):
        for module in [f"{layer_prefix(i)}self_attn.{n}" for n in ATTN_PROJ] + [
            f"{layer_prefix(i)}mlp.{n}" for n in MLP_PROJ
        ]:
            if module in quantized:
                writer.add({f"{module}.{k}": v for k, v in linear_tensors(w, module).items()})
    files = writer.finish()
    config = json.loads((merged_dir / "config.json").read_text())
    config["dtype"] = dtype_name(w.dtype)
    config["intermediate_size"] = w.mlp_width  # padded to whole int4 groups if ragged (scheme.mlp_width)
    if "torch_dtype" in config:
        config["torch_dtype"] = dtype_name(w.dtype)
    if w.scheme.quant_algo is not None:
        inline, hf_quant = hf_quant_configs(w.scheme)
        config["quantization_config"] = inline
        (out / "hf_quant_config.json").write_text(json.dumps(hf_quant, indent=4) + "\n")
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    copy_tokenizer(merged_dir, out)
    (out / "extra_llm_api_options.yaml").write_text(llm_api_options_yaml(opts))
    write_script(out / "serve.sh", serve_script(opts, w.cfg))
    write_meta(out, "hf", w, opts, w.cfg.vocab_size)
    write_readme(
        out,
        "TensorRT-LLM PyTorch backend",
        w,
        "Serve it: `./serve.sh` (trtllm-serve, OpenAI-compatible, "
        f"port {opts.port}; options in extra_llm_api_options.yaml), or docker/trtllm.Dockerfile.",
    )
    return {"layout": "hf (TensorRT-LLM PyTorch backend)", "files": [f.name for f in files]}


def copy_tokenizer(src: Path, out: Path) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, out / name)


def write_meta(out: Path, layout: str, w: Weights, opts: TrtOptions, vocab_size: int, **extra) -> None:
    meta = {
        "format": META_FORMAT,
        "version": META_VERSION,
        "layout": layout,
        "quant_algo": w.scheme.quant_algo,
        "group_size": w.scheme.group_size,
        "method": w.scheme.method,
        "dtype": dtype_name(w.dtype),
        "tp": opts.tp,
        "pp": opts.pp,
        "vocab_size": vocab_size,
        "intermediate_size_unpadded": w.cfg.intermediate_size,  # the model's; config.json holds the padded one
        **extra,
    }
    (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def write_readme(out: Path, layout: str, w: Weights, how_to_run: str) -> None:
    algo = w.scheme.quant_algo or f"none ({dtype_name(w.dtype)} weights)"
    (
        out / "README.md"
    ).write_text(f"""# TensorRT-LLM bundle ({layout}), written by lorafast-export {__version__}

quant_algo: {algo} (method: {w.scheme.method}). Adapters are merged into the weights: nothing here asks
TensorRT-LLM for LoRA/DoRA at run time.

{how_to_run}

## What was verified where this was built (without TensorRT-LLM)
{_verified(w.scheme.quant_algo)}
## Not verified here (needs a GPU with TensorRT-LLM)
- That your TensorRT-LLM release loads this directory and that its kernels (fp16/bf16 arithmetic, fused
  attention, paged KV cache) reproduce the report's numbers: run the server and compare a few prompts.
""")


def _verified(quant_algo: str | None) -> str:
    if quant_algo == W8A8_SQ:
        return """- The tensor names, dtypes and shapes are TensorRT-LLM's SmoothQuant parameters (its converter and
  quantization/layers.py); compared with NVIDIA ModelOpt's W8A8_SQ_PER_CHANNEL export of the same model through a
  documented tensor-by-tensor mapping (lorafast_export/targets/trt_llm/layout.py; bench/TRTLLM.md).
- Reading these files back by TensorRT-LLM's semantics (lorafast_export/targets/trt_llm/reader.py) gives exactly the
  quantized model's weights; the report's "artifact" stage is that reading, run in lorafast-export's reference
  decoder with every linear's input quantized per token as TensorRT-LLM's kernels do.
- Needs a GPU of compute capability 7.0-9.0 (TensorRT-LLM builds SmoothQuant engines for SM 70-90 only).
"""
    return """- The tensor names, dtypes, shapes and config keys are those NVIDIA ModelOpt writes for the same model and
  quant_algo (bench/trtllm_vs_modelopt.py; goldens in tests/targets/golden).
- Reading these files back by TensorRT-LLM's documented semantics (lorafast_export/targets/trt_llm/reader.py) gives
  exactly the quantized model's fake-quant weights; the report's "artifact" stage is that reading, run in
  lorafast-export's reference decoder.
"""


def write_script(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o755)


def llm_api_options_yaml(opts: TrtOptions) -> str:
    """LLM-API options (the file trtllm-serve takes with --extra_llm_api_options; newer releases also --config)."""
    lines = [
        "# TensorRT-LLM LLM-API options for trtllm-serve --extra_llm_api_options (PyTorch backend).",
        "kv_cache_config:                 # paged KV cache",
        f"  enable_block_reuse: {str(opts.enable_block_reuse).lower()}",
        f"  free_gpu_memory_fraction: {opts.kv_cache_free_gpu_memory_fraction}",
        "attn_backend: TRTLLM             # TensorRT-LLM's fused attention kernels",
    ]
    if opts.cuda_graphs:
        lines += ["cuda_graph_config:", "  enable_padding: true", f"  max_batch_size: {opts.max_batch_size}"]
    return "\n".join(lines) + "\n"


def serve_script(opts: TrtOptions, cfg) -> str:
    max_seq_len = opts.max_seq_len or cfg.max_position_embeddings
    return f"""#!/usr/bin/env bash
# Serve this bundle with TensorRT-LLM's PyTorch backend (OpenAI-compatible server on port {opts.port}).
# Needs a GPU and TensorRT-LLM (e.g. the nvcr.io/nvidia/tensorrt-llm/release image; see docker/trtllm.Dockerfile).
set -euo pipefail
here="$(cd "$(dirname "${{BASH_SOURCE[0]}}")" && pwd)"
exec trtllm-serve "$here" \\
  --backend pytorch \\
  --host 0.0.0.0 --port "${{PORT:-{opts.port}}}" \\
  --tp_size {opts.tp} --pp_size {opts.pp} \\
  --max_batch_size {opts.max_batch_size} --max_num_tokens {opts.max_num_tokens} --max_seq_len {max_seq_len} \\
  --extra_llm_api_options "$here/extra_llm_api_options.yaml" "$@"
"""
