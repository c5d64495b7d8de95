"""Peak memory of the streaming merge vs model size.

    python bench/merge_memory.py --layers 48 --hidden 512 [--shard-mb 64]

Builds a deep random Llama checkpoint + a LoRA on every linear, merges it in a fresh process, and prints the peak
anonymous RSS above the post-import baseline (file-backed mmap pages are page cache and excluded) against the
checkpoint size and one layer's size.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

CHILD = r"""
import json, sys, threading, time
from pathlib import Path
import torch
from lorafast_export.adapters import open_adapter
from lorafast_export.weights import open_model
from lorafast_export.merge import merge

def anon_kb():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1])

base, ad, out, shard = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
m, a = open_model(base), open_adapter(ad)
start = anon_kb(); peak = [start]; stop = False
def poll():
    while not stop:
        peak[0] = max(peak[0], anon_kb()); time.sleep(0.002)
t = threading.Thread(target=poll); t.start()
merge(m, [a], Path(out), max_shard_bytes=shard)
stop = True; t.join(); peak[0] = max(peak[0], anon_kb())
print(json.dumps({"peak_delta_mb": (peak[0] - start) / 1024}))
"""


def make_checkpoint(root: Path, layers: int, hidden: int, inter: int) -> tuple[Path, Path, int, int]:
    import peft
    import torch
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=1024,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=4,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    model.save_pretrained(root / "base")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    pm = peft.get_peft_model(model, peft.LoraConfig(r=8, target_modules=targets, init_lora_weights=False))
    pm.save_pretrained(root / "ad")
    total = sum(p.numel() * 4 for n, p in model.named_parameters())
    layer = sum(p.numel() * 4 for p in model.model.layers[0].parameters())
    return root / "base", root / "ad", total, layer


def measure(layers: int, hidden: int, inter: int, shard_mb: int) -> dict:
    with tempfile.TemporaryDirectory() as d:
        base, ad, total, layer = make_checkpoint(Path(d), layers, hidden, inter)
        t0 = time.perf_counter()
        res = subprocess.run(
            [sys.executable, "-c", CHILD, str(base), str(ad), str(Path(d) / "out"), str(shard_mb << 20)],
            capture_output=True,
            text=True,
            check=True,
        )
        wall = time.perf_counter() - t0
        peak = json.loads(res.stdout.strip().splitlines()[-1])["peak_delta_mb"]
    return {
        "layers": layers,
        "model_mb": total / 2**20,
        "layer_mb": layer / 2**20,
        "shard_mb": shard_mb,
        "peak_delta_mb": peak,
        "wall_s": wall,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--inter", type=int, default=1376)
    ap.add_argument("--shard-mb", type=int, default=64)
    a = ap.parse_args()
    r = measure(a.layers, a.hidden, a.inter, a.shard_mb)
    print("| layers | model MB | one layer MB | shard MB | peak extra RSS MB | wall s |")
    print("|---:|---:|---:|---:|---:|---:|")
    print(
        f"| {r['layers']} | {r['model_mb']:.0f} | {r['layer_mb']:.1f} | {r['shard_mb']} | "
        f"{r['peak_delta_mb']:.0f} | {r['wall_s']:.1f} |"
    )


if __name__ == "__main__":
    threading.stack_size(0)
    main()
