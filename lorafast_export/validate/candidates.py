"""Candidates: every stage a build produced, as something that gives logits and greedy tokens.

A layered candidate (`source`) is evaluated by the layer-streamed evaluator (validate/stream.py) and decodes
through its whole model built on the device only for the greedy check; a session candidate (a target's runtime)
gives whole-model logits and greedy tokens itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from lorafast_export.model.decoder import Decoder
from lorafast_export.validate.layers import DecoderSource, LayerSource, MergedSource


@dataclass
class Candidate:
    name: str
    logits: Callable[[torch.Tensor], torch.Tensor] | None  # [1, s] ids → [1, s, V] fp32 (session stages)
    generate: Callable[[list[int], int], list[int]] | None  # greedy continuation, new tokens only (sessions)
    note: str | None = None  # a session's runtime_note: what ran it when the target's own runtime did not
    source: LayerSource | None = None  # layered stages: evaluated by the streamed walk

    # a session's own batched greedy decoding (prompts, max_new_tokens) -> new tokens, when it has one
    generate_batch: Callable[[list[list[int]], int], list[list[int]]] | None = None
    # a session whose greedy decoding may run in another thread while its logits are computed (its decoding uses
    # a model of its own: onnxruntime-genai's beside the ONNX Runtime session of the logits)
    decodes_beside_logits: bool = False

    def greedy(
        self, prompts: list[list[int]], max_new_tokens: int, device="cpu", tick=None
    ) -> list[list[int]]:
        """Greedy continuations of a batch of prompts: a layered stage's whole model is built on the device for
        it, decodes the batch with its KV cache, and is dropped afterwards; a session decodes them itself."""
        from lorafast_export.validate.greedy import decoder_greedy_batch

        if self.source is None:
            if self.generate_batch is not None:
                return [list(t) for t in self.generate_batch(prompts, max_new_tokens)]
            return [list(self.generate(p, max_new_tokens)) for p in prompts]
        dec = self.source.decoder(device)
        try:
            return decoder_greedy_batch(dec, prompts, max_new_tokens, tick)
        finally:
            del dec


@torch.no_grad()
def decoder_greedy(dec: Decoder, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Greedy decoding with the decoder's explicit KV cache, on the device its weights are on."""
    device = dec.model.embed_tokens.weight.device
    logits, past = dec(torch.tensor([prompt], device=device))
    out: list[int] = []
    for _ in range(max_new_tokens):
        nxt = int(logits[0, -1].argmax())
        out.append(nxt)
        logits, past = dec(torch.tensor([[nxt]], device=device), past=past)
    return out


def decoder_candidate(name: str, dec: Decoder) -> Candidate:
    """An already built whole Decoder (small models, tests), evaluated layer by layer like the others."""
    return source_candidate(DecoderSource(name, dec))


def source_candidate(source: LayerSource, note: str | None = None) -> Candidate:
    return Candidate(source.name, None, None, note, source)


def merged_fp32_candidate(plan) -> Candidate:
    """The merge computed in fp32 on the validation device, layer by layer: isolates merge error from the
    checkpoint dtype's rounding."""
    return source_candidate(MergedSource("merged-fp32", plan, "base"))


def session_candidate(name: str, session) -> Candidate:
    # a session that can leave its logits on its device (our runtime on a GPU) is compared there
    logits = getattr(session, "device_logits", session.logits)
    return Candidate(
        name,
        lambda ids: logits(ids).float(),
        session.generate,
        getattr(session, "runtime_note", None),
        generate_batch=getattr(session, "generate_batch", None),
        decodes_beside_logits=getattr(session, "decodes_beside_logits", False),
    )
