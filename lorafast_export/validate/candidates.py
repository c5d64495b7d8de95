"""Candidates: every stage a build produced, as something that gives logits and greedy tokens."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lorafast_export.model.decoder import Decoder, build_decoder


@dataclass
class Candidate:
    name: str
    logits: Callable[[torch.Tensor], torch.Tensor]  # [1, s] ids → [1, s, V] fp32 logits
    generate: Callable[[list[int], int], list[int]]  # greedy continuation, new tokens only
    note: str | None = None  # a session's runtime_note: what ran it when the target's own runtime did not


@torch.no_grad()
def decoder_greedy(dec: Decoder, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Greedy decoding with the decoder's explicit KV cache."""
    logits, past = dec(torch.tensor([prompt]))
    out: list[int] = []
    for _ in range(max_new_tokens):
        nxt = int(logits[0, -1].argmax())
        out.append(nxt)
        logits, past = dec(torch.tensor([[nxt]]), past=past)
    return out


def decoder_candidate(name: str, dec: Decoder) -> Candidate:
    dec = dec.eval()

    @torch.no_grad()
    def logits(ids: torch.Tensor) -> torch.Tensor:
        return dec(ids)[0].float()

    return Candidate(name, logits, lambda p, n: decoder_greedy(dec, p, n))


def merged_fp32_candidate(plan) -> Candidate:
    """The merge computed in fp32 in memory: isolates merge error from the checkpoint dtype's rounding."""
    from lorafast_export.merge import merged_state

    cfg = dataclasses.replace(plan.base.config, tie_word_embeddings=plan.tie_word_embeddings)
    return decoder_candidate("merged-fp32", build_decoder(cfg, merged_state(plan, torch.float32)))


def session_candidate(name: str, session) -> Candidate:
    return Candidate(
        name,
        lambda ids: session.logits(ids).float(),
        session.generate,
        getattr(session, "runtime_note", None),
    )
