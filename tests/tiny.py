"""The tests' tiny models: they live in lorafast_export/testing.py (shared with bench/), plus a base + adapter pair."""

from __future__ import annotations

from pathlib import Path

from lorafast_export.testing import (  # noqa: F401
    FAMILIES,
    hf_logits,
    make_model,
    save_char_tokenizer,
    save_model,
    tiny_config,
    write_text,
)


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
