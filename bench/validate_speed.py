"""Validation speed: a ~30M-parameter Llama + LoRA, 50k eval tokens, on this machine's CPU.

    python bench/validate_speed.py [--tokens 50000]

Builds the model and adapter on the fly, then times `lorafast-export build --target hf` (validation included:
reference, bare base, merged-fp32 and artifact stages over the eval tokens, greedy checks on 8 prompts), and
the validation stage alone from the build's timings.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=50_000)
    a = ap.parse_args()
    import peft
    import torch
    import transformers

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from lorafast_export.testing import save_char_tokenizer

    root = Path(tempfile.mkdtemp())
    cfg = transformers.LlamaConfig(
        vocab_size=96,
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=4,
        num_attention_heads=12,
        num_key_value_heads=4,
        max_position_embeddings=1024,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(root / "base")
    save_char_tokenizer(root / "base")
    pm = peft.get_peft_model(
        model, peft.LoraConfig(r=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    pm.save_pretrained(root / "ad")
    text = (Path(__file__).resolve().parent.parent / "lorafast_export/data/text/code_eval.txt").read_text()
    (root / "e.txt").write_text(text * (1 + a.tokens // len(text)))
    t0 = time.perf_counter()
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "lorafast_export.cli",
            "--json",
            "build",
            "--base",
            str(root / "base"),
            "--adapter",
            str(root / "ad"),
            "--out",
            str(root / "out"),
            "--eval",
            f"e={root / 'e.txt'}",
            "--max-tokens",
            str(a.tokens),
            "--name",
            "speed",
        ],
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - t0
    if r.returncode not in (0, 1):
        print(r.stderr[-3000:])
        raise SystemExit(r.returncode)
    timings = json.loads(r.stdout)["timings_s"]
    print("| model params | eval tokens | validate stage s | whole build s |\n|---:|---:|---:|---:|")
    print(f"| {params / 1e6:.1f} M | {a.tokens} | {timings['validate']:.1f} | {wall:.1f} |")


if __name__ == "__main__":
    main()
