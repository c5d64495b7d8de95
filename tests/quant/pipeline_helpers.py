"""Tiny merged checkpoints (with a word-level tokenizer) and KL helpers for the quantize-stage tests."""

from __future__ import annotations

from pathlib import Path

import torch

from lorafast_export.model.decoder import load_decoder
from lorafast_export.weights import open_model
from tests.tiny import make_model, save_model

WORDS = [f"w{i}" for i in range(90)]


def save_word_tokenizer(path: Path) -> None:
    """A WordLevel tokenizer over WORDS (+ <unk>, <s>) whose ids fit the tiny models' vocabularies."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>").save_pretrained(path)


def word_text(n_words: int, seed: int = 0) -> str:
    g = torch.Generator().manual_seed(seed)
    return " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (n_words,), generator=g).tolist())


def tiny_checkpoint(path: Path, family: str = "llama", outliers: bool = False, seed: int = 0, **kw) -> Path:
    """A tiny merged checkpoint + tokenizer. outliers: a few norm channels x15 (activation outliers)."""
    kw = {"hidden": 64, "heads": 4, "kv_heads": 2, "intermediate_size": 128, "vocab": 128, **kw}
    model = make_model(family, seed=seed, **kw)
    if outliers:
        g = torch.Generator().manual_seed(seed + 5)
        with torch.no_grad():
            for layer in model.model.layers:
                for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                    norm.weight[torch.randperm(norm.weight.numel(), generator=g)[:4]] *= 15
    save_model(model, path)
    save_word_tokenizer(path)
    return path


def random_ids(samples: int, seq: int, seed: int, vocab: int = 128) -> torch.Tensor:
    return torch.randint(0, vocab, (samples, seq), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def mean_kl(merged: Path, dec, ids: torch.Tensor) -> float:
    """Mean per-token KL(fp model || dec) on ids."""
    ref = load_decoder(open_model(merged))(ids)[0].log_softmax(-1)
    got = dec(ids)[0].float().log_softmax(-1)
    return float((ref.exp() * (ref - got)).sum(-1).mean())
