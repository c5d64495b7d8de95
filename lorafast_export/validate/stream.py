"""The layer-streamed evaluator: every layered stage walks the decoder one layer at a time, together.

All eval blocks of all eval sets go through the walk at once: each stage's hidden states [blocks, seq, hidden]
(float32) stay on the validation device, and at layer i every stage builds its layer i (LayerSource.layer),
applies it to its hidden states in chunks of blocks, and drops it. Tensors several stages start from (the
base checkpoint's layer i, its fp32 merge) are read once per layer. Host and device memory hold the hidden
states plus about one layer per stage at a time, never a whole model; the weights of the base are read once
per walk, not once per stage.

After the last layer, `StageLogits` gives each stage's logits block by block (final norm + lm_head on the
device, float32), and a whole-model stage (a runtime session: ONNX Runtime, OpenVINO, our torch-compile
runtime) computes its logits in its own runtime, block by block.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from lorafast_export.model.decoder import Rotary, causal_mask
from lorafast_export.validate.layers import Head, LayerSource, Shared

log = logging.getLogger(__name__)

# Activation elements per chunk of blocks: bounds the temporaries of one layer's forward (attention scores,
# MLP intermediate), ~8 MiB of float32 on a CPU, ~4 GiB on a GPU. On a CPU small chunks stay in cache: a demo
# layer over 64 blocks took 0.34 s of CPU in chunks of 4-8 blocks against 0.49 s in one chunk (same outputs).
CHUNK_ELEMENTS = {"cpu": 1 << 21, "cuda": 1 << 30}


@dataclass
class Stage:
    """One model to evaluate: layered (`source`) or whole (`logits`: ids [1, s] -> [1, s, V] fp32)."""

    name: str
    source: LayerSource | None = None
    logits: Callable[[torch.Tensor], torch.Tensor] | None = None


def _rope_and_mask(cfg, seq: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    pos = torch.arange(seq, device=device)[None]
    cos, sin = Rotary(cfg).to(device)(pos, torch.float32)
    return cos, sin, causal_mask(seq, 0, device, cfg.sliding_window)


def _blocks_per_chunk(cfg, seq: int, device) -> int:
    per_block = seq * max(cfg.intermediate_size, cfg.num_heads * seq, cfg.hidden_size * 3)
    budget = CHUNK_ELEMENTS["cuda" if torch.device(device).type == "cuda" else "cpu"]
    return max(1, budget // max(per_block, 1))


@dataclass
class ExtraBlocks:
    """Blocks of another length that some stages carry through the same walk (the greedy check's prompts with the
    reference's continuation, validate/greedy.py teacher_forced_blocks): each layer is built once for both."""

    ids: torch.Tensor  # [blocks, seq]
    stages: tuple[str, ...]  # the stages that carry them
    hidden: dict[str, torch.Tensor] = field(default_factory=dict)  # filled by walk: stage -> [blocks, seq, H]


@torch.no_grad()
def walk(
    sources: list[LayerSource],
    ids: torch.Tensor,
    device,
    progress: Callable[[str], None] = lambda m: None,
    extra: ExtraBlocks | None = None,
) -> dict[str, torch.Tensor]:
    """ids [blocks, seq] -> {stage: final hidden states [blocks, seq, hidden] float32 on the device}; the stages
    named in extra also carry extra.ids, into extra.hidden."""
    if not sources:
        return {}
    ids = ids.to(device)
    n, seq = ids.shape
    shared: Shared = {}
    hidden = {s.name: s.embed(ids, shared) for s in sources}
    carry = [s for s in sources if extra is not None and s.name in extra.stages]
    if extra is not None:
        extra.ids = extra.ids.to(device)
        extra.hidden.update({s.name: s.embed(extra.ids, shared) for s in carry})
    shared.clear()
    rope = {s.name: _rope_and_mask(s.config, seq, device) for s in sources}  # per stage: a damaged rope shows
    rope_x = {s.name: _rope_and_mask(s.config, extra.ids.shape[1], device) for s in carry}
    layers = sources[0].config.num_layers
    t0, last = time.perf_counter(), 0.0
    for i in range(layers):
        for s in sources:
            layer = s.layer(i, device, shared)
            _apply(layer, hidden[s.name], rope[s.name], _blocks_per_chunk(s.config, seq, device))
            if s in carry:
                h = extra.hidden[s.name]
                _apply(layer, h, rope_x[s.name], _blocks_per_chunk(s.config, h.shape[1], device))
            del layer
        shared.clear()
        now = time.perf_counter() - t0
        if now - last >= 5.0 or i + 1 == layers:
            last = now
            progress(f"layers {i + 1}/{layers}, {len(sources)} stages, {n} blocks ({now:.1f} s)")
    return hidden


def _apply(layer, h: torch.Tensor, rope, step: int) -> None:
    """h [blocks, seq, H] <- layer(h), in place, `step` blocks at a time."""
    cos, sin, mask = rope
    for b0 in range(0, h.shape[0], step):
        h[b0 : b0 + step] = layer(h[b0 : b0 + step], cos, sin, mask)[0]


class StageLogits:
    """Logits of each stage, one block at a time: heads of layered stages stay resident on the device."""

    def __init__(
        self, stages: list[Stage], hidden: dict[str, torch.Tensor], ids: torch.Tensor, device, fetched=None
    ):
        """fetched: {whole-model stage: getter of its logits for every block, computed elsewhere beforehand}."""
        self.stages, self.hidden, self.ids, self.device = stages, hidden, ids, device
        self.fetched = fetched or {}
        self._shared: Shared = {}  # head tensors shared between stages (one read of an untouched lm_head)
        self.heads: dict[str, Head] = {
            s.name: s.source.head(device, self._shared) for s in stages if s.source is not None
        }
        if (
            torch.device(device).type == "cuda"
        ):  # fp32 copies of the heads once (GPU memory is ample), not per block
            copies: dict = {}
            for h in self.heads.values():
                h.cache_weights(copies)

    @torch.no_grad()
    def block(self, stage: Stage, b: int) -> torch.Tensor:
        """[seq - 1, V] float32 logits of block b (the last position has no label and is dropped)."""
        if stage.source is not None:
            return self.heads[stage.name](self.hidden[stage.name][b, :-1])
        if stage.name in self.fetched:
            return self.fetched[stage.name]()[b].to(self.device)
        return stage.logits(self.ids[b][None])[0, :-1].float().to(self.device)

    def close(self) -> None:
        self.heads.clear()
        self._shared.clear()
        self.fetched = {}
