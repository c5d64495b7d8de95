"""Target `torch-compile`: our own runtime (lorafast_export.runtime): paged KV cache, continuous batching,
compiled decode step (CUDA graphs on GPU), native int4/int8 weight-only kernels, optional AOTInductor packages.

Written by hand rather than exported because no torch-native generation client with a paged cache exists;
the runtime reuses the canonical decoder's modules and adds only attention over the paged pool.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lorafast_export.runtime.api import model_dir_of
from lorafast_export.runtime.artifact import resolve_dtype, write_artifact
from lorafast_export.runtime.loader import Runtime, open_runtime
from lorafast_export.runtime.options import RuntimeOptions
from lorafast_export.targets.registry import LowerInput, register


class TorchCompileSession:
    """A loaded artifact: logits by prefill, generation through the continuous-batching engine."""

    def __init__(self, model_dir: Path, device: str = "cpu", **overrides):
        self.runtime: Runtime = open_runtime(model_dir, device, **overrides)

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.runtime.logits(input_ids)

    def device_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """logits() left on the runtime's device: the validation compares them there, so an 8B block's 131 MB of
        float32 logits do not go to the host and back (the same prefill, the same values)."""
        return self.runtime.device_logits(input_ids)

    def generate(self, input_ids: list[int], max_new_tokens: int) -> list[int]:
        return self.runtime.generate_batch([list(input_ids)], max_new_tokens)[0]

    def generate_batch(self, prompts: list[list[int]], max_new_tokens: int | list[int]) -> list[list[int]]:
        return self.runtime.generate_batch(prompts, max_new_tokens)

    def speculation_counts(self) -> tuple[int, int, int] | None:
        """With a draft: the speculative rounds run so far, the tokens drafted and those the model accepted (the
        load-time warm-up's included: a caller takes differences); None without a draft."""
        eng = self.runtime.engine
        if eng.draft_cache is None:
            return None
        return eng.stats.spec_rounds, eng.stats.drafted, eng.stats.accepted


class TorchCompileTarget:
    name = "torch-compile"
    install_hint = (
        "always available (needs only torch); CUDA graphs and int4 kernels need a CUDA build of torch"
    )

    def available(self) -> tuple[bool, str]:
        return True, self.install_hint

    def lower(self, inp: LowerInput, out_dir: Path) -> dict:
        opts = RuntimeOptions.from_dict(inp.recipe.target.options)
        dtype = resolve_dtype(inp.recipe.target.dtype, inp.config)
        facts = write_artifact(Path(inp.merged_dir), Path(out_dir), dtype, opts, inp.quantized)
        if opts.aot:
            from lorafast_export.targets.torch_compile.aot import build_aot

            entry = build_aot(Path(out_dir), "cuda" if torch.cuda.is_available() else "cpu")
            facts["aot"] = {k: entry[k] for k in ("device", "prefill", "decode")}
        return facts

    def load(
        self, model_dir: Path, device: str = "cpu", draft: Path | None = None, **overrides
    ) -> TorchCompileSession:
        """draft: another torch-compile artifact (root or model/) that drafts for speculative decoding;
        overrides: RuntimeOptions fields for this session (validation loads with compile="off")."""
        draft_dir = None if draft is None else model_dir_of(draft)
        return TorchCompileSession(Path(model_dir), device, draft_dir=draft_dir, **overrides)


register(TorchCompileTarget())
