"""Target `trt-llm`: a TensorRT-LLM deployment bundle, in NVIDIA ModelOpt's layouts, proven without TensorRT-LLM.

Two layouts (recipe target.options.legacy; CLI --trt-llm-legacy --tp N --pp M):
- default, TensorRT-LLM's PyTorch backend (current releases): an HF-style checkpoint in ModelOpt's unified format
  (config.json quantization_config + hf_quant_config.json, `weight` / `weight_scale` / `pre_quant_scale`), the
  tokenizer, extra_llm_api_options.yaml (paged KV cache with block reuse, TRTLLM attention, CUDA graphs) and
  serve.sh (`trtllm-serve`). Written by trt/hf_bundle.py.
- legacy, TensorRT engines (TensorRT-LLM <= 1.2): the TensorRT-LLM checkpoint (config.json + rank{i}.safetensors,
  tensor- and pipeline-parallel shards) and build.sh (`trtllm-build`). Written by trt/legacy.py.

Method → quant_algo: none → fp16/bf16; int8 → W8A16; awq / gptq / rtn (4-bit, symmetric, group 64 or 128, no
act-order) → W4A16_AWQ with pre_quant_scale = 1 (our AWQ scales are already folded into the norms and v/up_proj
rows); smoothquant → W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN in the legacy layout only (int8 per-channel weights,
int8 activations quantized per token at run time: our scheme exactly; layout from TensorRT-LLM's own converter and
layers, since ModelOpt exports only the static per-tensor W8A8_SQ_PER_CHANNEL). Refused with the reason and the fix
(trt/scheme.py): smoothquant in the PyTorch-backend bundle (its `get_quant_method` has no INT8 W8A8 linear; use
--trt-llm-legacy), asymmetric codes (these kernels take no zero point), act-order, other group sizes, a quantized
lm_head. Codes are never re-rounded: the files hold the QTensor's integers and scales (float32, as ModelOpt and
TensorRT-LLM's converter write them; symmetric scales may be negative, see quant/rtn.py). A ragged MLP width under
W4A16_AWQ (e.g. 1376 at group 128) is padded exactly to whole groups per shard (trt/scheme.py mlp_width: rows and
columns of int4 zeros), and the bundle's config carries the padded intermediate_size.

GPTQ checkpoints: TensorRT-LLM's main branch converts HF GPTQ checkpoints for its PyTorch backend
(tensorrt_llm/_torch/models/checkpoints/hf/gptq.py: 4-bit gptq/gptq_v2, group 64 or 128, zero points, no
act-order) into its W4A16_GPTQ linear; the releases' linear.py `get_quant_method` we read dispatches only
W4A16_AWQ / W4A8_AWQ groupwise. Symmetric GPTQ codes need no zero point, so they ship as W4A16_AWQ here.

Why the files are written here rather than by ModelOpt: ModelOpt exports what ITS quantizers computed (it
re-quantizes weights from its own amax and AWQ search); our codes come from our IR and must reach TensorRT-LLM
unchanged. ModelOpt is the reference for the layout: bench/trtllm_vs_modelopt.py exports the same model with
ModelOpt and compares names, dtypes, shapes and configs (goldens in tests/targets/golden/). SmoothQuant is the
exception: ModelOpt's int8_sq export is W8A8_SQ_PER_CHANNEL (static per-tensor activation scale), so our per-token
layout is compared with it through the tensor-by-tensor mapping in trt/layout.py (`modelopt_sq_as_ours`).

Validation: TensorRT-LLM cannot run here. The "artifact" stage of the report is OUR READING of the bundle
(trt/reader.py: the dequantization TensorRT-LLM's kernels perform, from its source, including its load-time
casts of scales to the model dtype, and for SmoothQuant its per-token int8 quantization of every linear's input)
run in the canonical decoder. TensorRT-LLM itself was not run; its kernels' fp16/bf16 arithmetic, int32 GEMM
accumulation and fused attention are not part of that number.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from lorafast_export.errors import UnsupportedError
from lorafast_export.targets.registry import LowerInput, register

log = logging.getLogger(__name__)

VERIFIED_NOTE = (
    "artifact stage = lorafast-export's reading of the bundle (TensorRT-LLM's dequantization and, "
    "for SmoothQuant, its per-token activation quantization, from its source) in the canonical decoder; "
    "TensorRT-LLM itself was not run"
)


class TrtLlmReadSession:
    """The bundle as TensorRT-LLM would materialize its weights (and, for SmoothQuant, quantize activations per
    token), run by the canonical decoder (not TensorRT-LLM)."""

    runtime_note = VERIFIED_NOTE

    def __init__(self, model_dir: Path, device: str = "cpu"):
        self.model_dir = Path(model_dir)
        self.device = "cpu" if device == "auto" else device
        self._decoder = (
            None  # built on first use: validation reads an hf-layout bundle layer by layer instead
        )

    @property
    def decoder(self):
        if self._decoder is None:
            from lorafast_export.targets.trt_llm.reader import reference_decoder

            self._decoder = reference_decoder(self.model_dir, runtime=True).to(self.device)
        return self._decoder

    def layer_source(self):
        """The bundle as validation's layer-streamed evaluator reads it, one tensor at a time (the PyTorch-backend
        layout); None for engine checkpoints (rank files, SmoothQuant activations): those run whole."""
        from lorafast_export.targets.trt_llm.reader import LazyHFBundle, read_meta

        if read_meta(self.model_dir)["layout"] != "hf":
            return None
        from lorafast_export.validate.layers import StoreSource

        bundle = LazyHFBundle(self.model_dir, runtime=True)
        return StoreSource("artifact", bundle.config, bundle, getter=bundle.get)

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.decoder(input_ids.to(self.device))[0].float().cpu()

    @torch.no_grad()
    def generate(self, input_ids: list[int], max_new_tokens: int) -> list[int]:
        logits, past = self.decoder(torch.tensor([input_ids], device=self.device))
        new: list[int] = []
        for _ in range(max_new_tokens):
            new.append(int(logits[0, -1].argmax()))
            logits, past = self.decoder(torch.tensor([[new[-1]]], device=self.device), past=past)
        return new


class TrtLlmTarget:
    name = "trt-llm"
    # requires_symmetric and the recipe rule for SmoothQuant: its TargetSpec (specs.py)
    install_hint = (
        "lowering needs nothing extra; serving needs a GPU with TensorRT-LLM (docker/trtllm.Dockerfile, "
        "nvcr.io/nvidia/tensorrt-llm/release). Validation here reads the bundle without TensorRT-LLM"
    )

    def available(self) -> tuple[bool, str]:
        return True, self.install_hint

    def lower(self, inp: LowerInput, out_dir: Path) -> dict:
        from lorafast_export.targets.trt_llm.hf_bundle import write_hf_bundle
        from lorafast_export.targets.trt_llm.legacy import write_legacy
        from lorafast_export.targets.trt_llm.scheme import (
            TrtOptions,
            legacy_problems,
            mlp_width,
            resolve_dtype,
            scheme_for,
        )
        from lorafast_export.targets.trt_llm.weights import Weights

        opts = TrtOptions.from_dict(dict(inp.recipe.target.options or {}))
        cfg = inp.config
        scheme = scheme_for(inp.quantized, legacy=opts.legacy)
        problems = legacy_problems(cfg, scheme, opts.tp, opts.pp) if opts.legacy else []
        if problems:
            raise UnsupportedError(
                f"cannot shard this model for TensorRT-LLM (tp={opts.tp}, pp={opts.pp}):\n  - "
                + "\n  - ".join(problems)
            )
        dtype = resolve_dtype(inp.recipe.target.dtype, cfg.torch_dtype)
        width = mlp_width(cfg.intermediate_size, scheme, opts.tp)  # W4A16: ragged MLP widths padded exactly
        weights = Weights(Path(inp.merged_dir), cfg, inp.quantized, scheme, dtype, width)
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        write = write_legacy if opts.legacy else write_hf_bundle
        facts = write(weights, Path(inp.merged_dir), out, opts)
        log.info(
            "trt-llm: wrote %s bundle (%s) to %s", "legacy" if opts.legacy else "hf", scheme.quant_algo, out
        )
        return {
            "quant_algo": scheme.quant_algo,
            "group_size": scheme.group_size,
            "dtype": str(dtype).split(".")[-1],
            "tp": opts.tp,
            "pp": opts.pp,
            "intermediate_size": width,
            "intermediate_size_unpadded": cfg.intermediate_size,
            "validated_by": VERIFIED_NOTE,
            **facts,
        }

    def load(self, model_dir: Path, device: str = "cpu") -> TrtLlmReadSession:
        """Not TensorRT-LLM: our reference reading of the bundle in the canonical decoder (see module doc)."""
        return TrtLlmReadSession(Path(model_dir), device)


register(TrtLlmTarget())
