"""Target `openvino`: a stateful OpenVINO IR that openvino-genai runs as is, our codes as compressed weights.

How (lorafast_export/targets/openvino/):
- export.py   `openvino.convert_model` traces the canonical decoder (wrapped for genai's I/O names: input_ids,
              attention_mask, position_ids → logits, past_key_values.N.key/value → present.N.key/value), then
              a beam_idx Gather is put in front of every past input and
              `openvino._offline_transformations.apply_make_stateful_transformation` turns the KV inputs/outputs
              into ReadValue/Assign variables (zero-initialised to [batch, kv_heads, 0, head_dim]).
- compress.py each quantized linear's f32 weight Constant is replaced by the QTensor's codes as an i4/i8
              (symmetric) or u4/u8 (with u4/u8 zero points) Constant → Convert → [Subtract] → Multiply(scale)
              → [Reshape] chain: the pattern the CPU plugin runs as a compressed FullyConnected. Not a
              requantization; a test reads the constants back and compares them with the QTensor bit for bit.
- lower.py    writes the IR (unquantized tensors in f32), tokenizer/detokenizer IRs (openvino-tokenizers),
              config.json, generation_config.json and the HF tokenizer files.
- session.py  logits through an openvino infer request (state reset per call), generate() through
              openvino_genai.LLMPipeline (SDPA backend, greedy, no chat template, no EOS stop),
              generate_batch() through ContinuousBatchingPipeline with a SchedulerConfig (paged attention).

Why not optimum-intel: optimum-intel 2.2 pins transformers < 5.6, optimum ~= 2.3 and huggingface-hub < 1.22,
which clash with our pins (transformers 5.17). It would also export transformers' modelling code, not the
canonical decoder that our quantized form runs on, so our codes would have to be requantized by NNCF. Tracing
our own decoder needs only openvino (+ genai/tokenizers to run), and the two transformations above are the
public pieces optimum-intel itself uses.

The lowered graph's op inventory and the lowering error measured on the test models (f32 session and the
runtime's defaults): bench/OPENVINO.md, "Graph and lowering error". The tests check both graphs and bound the
error; validation reports the runtime-default precision as its own stage.

Limits: W8A8 activation quantization runs as explicit float ops (reduce-max, divide, round, clamp, multiply), the
reference's arithmetic, not an int8 GEMM. Act-order groups must hold group_size columns each (GPTQ's g_idx does).
Sliding-window attention (mistral) is exact in the stateful SDPA path (LLMPipeline, our logits) through the mask,
but the paged-attention rewrite of ContinuousBatchingPipeline only recognises the windows of phi3/gpt-oss-style
masks, so there a context longer than the window attends to everything (lower() logs a warning). Lowering holds
the whole f32 model in memory (traced module + IR; not measured, expect 2-3x its f32 size at peak): quantized
weights are traced dequantized and swapped for their codes afterwards, so lowering is not streamed by layer.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from lorafast_export.targets.registry import LowerInput, register


class OpenVINOTarget:
    name = "openvino"
    install_hint = "pip install 'lorafast-export[openvino]'"

    def available(self) -> tuple[bool, str]:
        missing = []
        for module in ("openvino", "openvino_genai", "openvino_tokenizers"):
            try:
                importlib.import_module(module)
            except ImportError:
                missing.append(module)
        if missing:
            return False, f"{', '.join(missing)} not importable; {self.install_hint}"
        return True, "openvino, openvino_genai and openvino_tokenizers import"

    def lower(self, inp: LowerInput, out_dir: Path) -> dict:
        from lorafast_export.targets.openvino.lower import lower_openvino

        return lower_openvino(inp, out_dir)

    def load(self, model_dir: Path, device: str = "cpu", precision: str = "f32"):
        """A session; precision "f32" (validation) or "default" (the runtime's own: bf16, u8 KV on this CPU)."""
        from lorafast_export.targets.openvino.session import OVSession

        return OVSession(model_dir, device, precision)


register(OpenVINOTarget())
