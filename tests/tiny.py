"""Tiny models and adapters built on the fly (no hub access): the ground truth is transformers + PEFT."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

FAMILIES = {
    "llama": transformers.LlamaConfig,
    "mistral": transformers.MistralConfig,
    "qwen2": transformers.Qwen2Config,
}


def tiny_config(
    family: str = "llama",
    *,
    tie: bool = False,
    rope: dict | None = None,
    layers: int = 2,
    vocab: int = 96,
    hidden: int = 32,
    heads: int = 4,
    kv_heads: int = 2,
    **kw,
):
    cls = FAMILIES[family]
    kw.setdefault("intermediate_size", 48)
    cfg = cls(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        tie_word_embeddings=tie,
        max_position_embeddings=256,
        **kw,
    )
    if rope is not None:
        cfg.rope_parameters = rope
    if family == "mistral":
        cfg.sliding_window = kw.get("sliding_window", 4096)
    return cfg


def make_model(family: str = "llama", seed: int = 0, dtype=torch.float32, **kw):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(family, **kw), dtype=torch.float32)
    with torch.no_grad():  # random init has tiny weights; make them large enough that errors would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif p.dim() == 2:
                p.normal_(0, 0.2)
            else:
                p.normal_(0, 0.1)
    return model.to(dtype).eval()


def save_model(model, path: Path) -> Path:
    model.save_pretrained(path, safe_serialization=True)
    return Path(path)


def hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def save_char_tokenizer(path: Path, vocab: int = 96) -> None:
    """A character-level tokenizer with `vocab` ids (<unk>, <s>, then printable ASCII), BOS added."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors

    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    tokens = ["<unk>", "<s>"] + chars[: vocab - 2]
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        model_input_names=["input_ids", "attention_mask"],
    )
    fast.save_pretrained(path)


def write_text(path: Path, n_chars: int = 6000, seed: int = 0) -> Path:
    import random

    rnd = random.Random(seed)
    words = ["the", "model", "adapter", "merge", "def", "return", "value", "(x)", "layer", "token", "=", ":"]
    text = " ".join(rnd.choice(words) for _ in range(n_chars // 4))
    path.write_text(text[:n_chars])
    return path


def save_base_and_adapter(root: Path, model_kw: dict | None = None, half_base: bool = False, **adapter_kw):
    """root/base (a tiny llama + char tokenizer, fp16 if half_base) and root/ad (a PEFT LoRA made on that base,
    with make_adapter's adapter_kw); returns the base model (float32, fp16-rounded if half_base)."""
    from tests.merge.test_merge_vs_peft import make_adapter

    base = make_model("llama", **(model_kw or {}))
    save_model(base.half() if half_base else base, root / "base")
    base = base.float()
    save_char_tokenizer(root / "base")
    make_adapter(base, root / "ad", **adapter_kw)
    return base
