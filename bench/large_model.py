"""Larger than memory: merge (+ int8 / RTN int4 quantization) of a 13B-shaped fp16 Llama on a 24 GB machine.

    python bench/large_model.py --workdir /tmp/big [--layers 40] [--keep]

Generates a random fp16 Llama-2-13B-shaped checkpoint (40 layers, hidden 5120, ~26 GB) in 1-layer shards plus a
rank-16 LoRA on every linear, then runs `lorafast-export merge` and `build --quant int8|rtn --target hf` in fresh
processes, sampling each process's peak RSS (VmHWM) and wall time. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

SHAPE = {
    "hidden_size": 5120,
    "intermediate_size": 13824,
    "num_attention_heads": 40,
    "num_key_value_heads": 40,
    "vocab_size": 32000,
}


def generate(root: Path, layers: int) -> tuple[Path, Path, float]:
    import torch
    from safetensors.torch import save_file

    base = root / "base"
    base.mkdir(parents=True, exist_ok=True)
    h, i, v = SHAPE["hidden_size"], SHAPE["intermediate_size"], SHAPE["vocab_size"]
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "num_hidden_layers": layers,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
        "dtype": "float16",
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        **SHAPE,
    }
    (base / "config.json").write_text(json.dumps(cfg))
    g = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0

    def rnd(*shape):
        return (torch.randn(*shape, generator=g, dtype=torch.float32) * 0.02).half()

    groups = [("embed", {"model.embed_tokens.weight": rnd(v, h)})]
    groups += [(f"layer{n}", None) for n in range(layers)]
    groups += [
        ("final", {"model.norm.weight": torch.ones(h, dtype=torch.float16), "lm_head.weight": rnd(v, h)})
    ]
    for k, (name, tensors) in enumerate(groups):
        if tensors is None:
            n = int(name[5:])
            p = f"model.layers.{n}."
            tensors = {
                p + "input_layernorm.weight": torch.ones(h, dtype=torch.float16),
                p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.float16),
            }
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                tensors[p + f"self_attn.{proj}.weight"] = rnd(h, h)
            tensors[p + "mlp.gate_proj.weight"] = rnd(i, h)
            tensors[p + "mlp.up_proj.weight"] = rnd(i, h)
            tensors[p + "mlp.down_proj.weight"] = rnd(h, i)
        fname = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file(tensors, str(base / fname), metadata={"format": "pt"})
        weight_map.update({t: fname for t in tensors})
        total += sum(t.numel() * 2 for t in tensors.values())
    (base / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    ad = root / "lora"
    ad.mkdir(exist_ok=True)
    lora, r = {}, 16
    for n in range(layers):
        for mod, (o, ii) in {
            "self_attn.q_proj": (h, h),
            "self_attn.v_proj": (h, h),
            "mlp.down_proj": (h, i),
        }.items():
            key = f"base_model.model.model.layers.{n}.{mod}"
            lora[key + ".lora_A.weight"] = torch.randn(r, ii, generator=g) * 0.01
            lora[key + ".lora_B.weight"] = torch.randn(o, r, generator=g) * 0.01
    save_file(lora, str(ad / "adapter_model.safetensors"))
    (ad / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "r": r,
                "lora_alpha": 32,
                "target_modules": ["q_proj", "v_proj", "down_proj"],
            }
        )
    )
    return base, ad, total / 1e9


def peak_rss_run(cmd: list[str]) -> tuple[float, float, int]:
    """(peak RSS GB from /proc VmHWM sampled until exit, wall s, return code)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = [0]

    def poll():
        while proc.poll() is None:
            try:
                for line in open(f"/proc/{proc.pid}/status"):
                    if line.startswith("VmHWM:"):
                        peak[0] = max(peak[0], int(line.split()[1]))
            except FileNotFoundError:
                break
            time.sleep(0.2)

    t = threading.Thread(target=poll)
    t.start()
    _, err = proc.communicate()
    t.join()
    if proc.returncode:
        print(err[-3000:], file=sys.stderr)
    return peak[0] / 1e6, time.perf_counter() - t0, proc.returncode


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="/tmp/lorafast-big")
    ap.add_argument("--layers", type=int, default=40)
    ap.add_argument("--methods", default="int8,rtn")
    ap.add_argument(
        "--keep", action="store_true", help="keep the generated checkpoint (and reuse a kept one)"
    )
    ap.add_argument("--generate-only", action="store_true")
    a = ap.parse_args()
    root = Path(a.workdir)
    cli = [sys.executable, "-m", "lorafast_export.cli", "-q"]
    t0 = time.perf_counter()
    index = root / "base" / "model.safetensors.index.json"
    if (
        a.keep and index.exists() and (root / "lora" / "adapter_config.json").exists()
    ):  # reuse a kept checkpoint
        base, ad = root / "base", root / "lora"
        gb = json.loads(index.read_text())["metadata"]["total_size"] / 1e9
        rows = [("reuse kept checkpoint", gb, None, time.perf_counter() - t0, 0)]
    else:
        base, ad, gb = generate(root, a.layers)
        rows = [("generate checkpoint", gb, None, time.perf_counter() - t0, 0)]
    if a.generate_only:
        return
    rss, wall, rc = peak_rss_run(
        [*cli, "merge", "--base", str(base), "--adapter", str(ad), "--out", str(root / "merged"), "--force"]
    )
    rows.append(("merge (LoRA r16 on q/v/down)", gb, rss, wall, rc))
    shutil.rmtree(root / "merged", ignore_errors=True)
    for m in [x for x in a.methods.split(",") if x]:
        rss, wall, rc = peak_rss_run(
            [
                *cli,
                "build",
                "--base",
                str(base),
                "--adapter",
                str(ad),
                "--target",
                "hf",
                "--quant",
                m,
                "--no-validate",
                "--no-cache",
                "--force",
                "--out",
                str(root / f"q-{m}"),
            ]
        )
        rows.append((f"merge + {m} + hf checkpoint", gb, rss, wall, rc))
        shutil.rmtree(root / f"q-{m}", ignore_errors=True)
    print("| step | model GB (fp16) | peak RSS GB | wall s | exit |\n|---|---:|---:|---:|---:|")
    for name, size, peak, wall, rc in rows:
        print(f"| {name} | {size:.1f} | {'—' if peak is None else f'{peak:.2f}'} | {wall:.0f} | {rc} |")
    if not a.keep:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
