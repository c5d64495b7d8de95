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

Op inventory of a lowered 2-layer llama (openvino 2026.4.1): ScaledDotProductAttention ×2 (one per layer),
ReadValue ×4 / Assign ×4 (k and v per layer), Parameters input_ids, attention_mask, position_ids, beam_idx;
MatMul ×15 (7 per layer + lm_head). ContinuousBatchingPipeline rewrites every SDPA into PagedAttentionExtension.
GQA is expanded with Unsqueeze → Broadcast → Reshape, the form that rewrite recognises. The CPU plugin's
runtime graph has per layer: 2 RMS, 2 RoPE (q and k; rotate_half is traced in the sliced form its fusion
matches), 1 ScaledDotProductAttention, 7 FullyConnected, with u4/i4/u8/i8 weights when quantized (compressed
kernels, not f32 copies). The tests check both graphs.

Lowering error (session precision "f32": f32 inference, f32 KV cache, dynamic activation quantization off) on the
tiny models of tests/tiny.py (logits up to ~5 in magnitude), 2 x 64 random tokens:
  fp32 (llama, llama tied + llama3 rope, qwen2 with qkv bias, mistral with an 8-token window) vs the canonical
  decoder: max-abs <= 8.3e-6; int4 asym g32 (ragged last group), int4 sym g16 act-order, int8 sym per channel vs
  the fake-quant decoder (model.quantized.fake_quant_decoder): max-abs <= 5.9e-6; mean KL ~2e-13 (float64).
  W8A8 (int8 weights + per-token int8 activations): max-abs 2e-6 on most inputs, but the activation rounding is a
  step function, so a float-rounding difference upstream can flip one int8 activation code (seen: 3.5e-2 max-abs
  on 2 x 24 tokens, KL still < 1e-4).
Greedy tokens from LLMPipeline and from ContinuousBatchingPipeline (3 prompts at once) equal the reference's in
every tested case (mistral with its 8-token window: LLMPipeline only, see Limits). With the runtime's defaults (bf16, u8 KV cache, int8 dynamic activation quantization on
compressed matmuls) the error is far larger: on tiny llama fp32 max-abs 0.19, KL 1.8e-4, same top-1 97%; int4
max-abs 0.22, KL 4.6e-4, same top-1 95%. Validation reports it as its own stage.

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

from lorafast_export.errors import LorafastError
from lorafast_export.targets.registry import LowerInput, register


class OpenVINOTarget:
    name = "openvino"
    needs_tokenizer = True  # the artifact ships the tokenizer its runtime's generation client reads
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

    @staticmethod
    def option_problems(options: dict, dtype: str) -> list[str]:
        """lower()'s own checks of target.options and target.dtype, run when the recipe is read."""
        from lorafast_export.targets.openvino.lower import check_dtype, check_options

        problems = []
        for check, value in ((check_options, options), (check_dtype, dtype)):
            try:
                check(value)
            except LorafastError as e:  # each message names its recipe field and the fix
                problems.append(str(e))
        return problems

    def lower(self, inp: LowerInput, out_dir: Path) -> dict:
        from lorafast_export.targets.openvino.lower import lower_openvino

        return lower_openvino(inp, out_dir)

    def load(self, model_dir: Path, device: str = "cpu", precision: str = "f32"):
        """A session; precision "f32" (validation) or "default" (the runtime's own: bf16, u8 KV on this CPU)."""
        from lorafast_export.targets.openvino.session import OVSession

        return OVSession(model_dir, device, precision)


register(OpenVINOTarget())
