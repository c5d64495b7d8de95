"""Running a lowered artifact: logits through openvino, generation through openvino-genai.

Precision "f32" is what validation compares: f32 inference, f32 KV cache (key and value) and no dynamic
activation quantization. The CPU plugin otherwise computes in bf16 where the CPU has it, keeps a u8 KV cache and
quantizes activations to int8 per group of 32 in front of compressed-weight matmuls (DYNAMIC_QUANTIZATION_GROUP_SIZE
defaults to 32): each of those alone moves logits far beyond float rounding. Precision "default" leaves the runtime's
defaults, which is what a user who loads the artifact gets; validation reports it as an extra stage.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lorafast_export.errors import InputError
from lorafast_export.targets.openvino.lower import MODEL_XML

PRECISIONS = {
    "f32": {
        "INFERENCE_PRECISION_HINT": "f32",
        "KV_CACHE_PRECISION": "f32",
        "KEY_CACHE_PRECISION": "f32",
        "VALUE_CACHE_PRECISION": "f32",
        "DYNAMIC_QUANTIZATION_GROUP_SIZE": "0",
    },
    "default": {},
}
DEVICES = {"cpu": "CPU", "gpu": "GPU", "npu": "NPU"}


def runtime_properties(precision: str) -> dict[str, str]:
    if precision not in PRECISIONS:
        raise InputError(f"openvino precision {precision!r}: use one of {', '.join(PRECISIONS)}.")
    return dict(PRECISIONS[precision])


def ov_device(device: str) -> str:
    return DEVICES.get(device.lower(), device.upper())


def greedy_config(max_new_tokens: int):
    """Greedy decoding of exactly max_new_tokens new tokens, raw continuation (no chat template, no EOS stop)."""
    import openvino_genai as og

    gc = og.GenerationConfig()
    gc.max_new_tokens = max_new_tokens
    gc.min_new_tokens = max_new_tokens
    gc.ignore_eos = True
    gc.do_sample = False
    gc.apply_chat_template = False
    return gc


def _ids_tensor(ids: list[int]):
    import openvino as ov

    return ov.Tensor(np.asarray([ids], dtype=np.int64))


def default_scheduler(n_prompts: int, cache_gb: int = 1):
    """Paged-attention scheduler for ContinuousBatchingPipeline: room for every prompt at once."""
    import openvino_genai as og

    sc = og.SchedulerConfig()
    sc.cache_size = cache_gb
    sc.max_num_seqs = max(n_prompts, 1)
    sc.dynamic_split_fuse = True
    return sc


def generate_batch(
    model_dir: Path,
    prompts: list[list[int]],
    max_new_tokens: int,
    device: str = "cpu",
    precision: str = "f32",
    scheduler=None,
) -> list[list[int]]:
    """Greedy new tokens for several prompts at once through ContinuousBatchingPipeline (paged attention)."""
    import openvino_genai as og

    pipe = og.ContinuousBatchingPipeline(
        str(model_dir),
        scheduler or default_scheduler(len(prompts)),
        ov_device(device),
        runtime_properties(precision),
    )
    results = pipe.generate([_ids_tensor(p) for p in prompts], [greedy_config(max_new_tokens)] * len(prompts))
    return [list(r.m_generation_ids[0]) for r in results]


class OVSession:
    """A lowered model/ directory, loaded for validation and benchmarks."""

    def __init__(self, model_dir: Path, device: str = "cpu", precision: str = "f32"):
        import openvino as ov

        self.model_dir, self.device, self.precision = Path(model_dir), ov_device(device), precision
        self.properties = runtime_properties(precision)
        if not (self.model_dir / MODEL_XML).exists():
            raise InputError(f"{self.model_dir}: no {MODEL_XML}; is this the model/ of an openvino artifact?")
        self.compiled = ov.Core().compile_model(self.model_dir / MODEL_XML, self.device, self.properties)
        self.request = self.compiled.create_infer_request()
        self._llm = None

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:  # [b, s] → [b, s, V] fp32
        b, s = input_ids.shape
        self.request.reset_state()  # the KV cache lives in the request's variables
        out = self.request.infer(
            {
                "input_ids": input_ids.cpu().numpy().astype(np.int64),
                "attention_mask": np.ones((b, s), dtype=np.int64),
                "position_ids": np.broadcast_to(np.arange(s, dtype=np.int64), (b, s)).copy(),
                "beam_idx": np.arange(b, dtype=np.int32),
            }
        )
        self.request.reset_state()
        return torch.from_numpy(np.array(out["logits"], dtype=np.float32))

    def llm_pipeline(self):
        """openvino_genai.LLMPipeline on the stateful IR as written (SDPA backend, our KV state)."""
        import openvino_genai as og

        if self._llm is None:
            self._llm = og.LLMPipeline(
                str(self.model_dir), self.device, ATTENTION_BACKEND="SDPA", **self.properties
            )
        return self._llm

    def generate(self, input_ids: list[int], max_new_tokens: int) -> list[int]:  # greedy, new tokens only
        result = self.llm_pipeline().generate(_ids_tensor(list(input_ids)), greedy_config(max_new_tokens))
        return list(result.tokens[0])

    def generate_batch(
        self, prompts: list[list[int]], max_new_tokens: int, scheduler=None
    ) -> list[list[int]]:
        return generate_batch(self.model_dir, prompts, max_new_tokens, self.device, self.precision, scheduler)
