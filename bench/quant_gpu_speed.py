"""The quantize stage on CUDA: same answer as on the CPU (tiny model), and time per layer on a Llama-3-8B shape.

    python bench/quant_gpu_speed.py --layers 4 --samples 128 --seq-len 2048

Part 1: a tiny llama quantized with device=cpu and device=cuda by every calibrated method; prints the max
logit difference between the two fake-quant decoders. Part 2: random fp16 weights of Llama-3-8B's shape
(hidden 4096, MLP 14336, 32 heads / 8 KV heads, vocab 128256) with --layers decoder layers; GPTQ and AWQ at
4 bits g128 with samples x seq_len calibration tokens on CUDA; prints seconds per layer and the 32-layer
extrapolation (the walk is strictly per layer, so time is linear in depth).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lorafast_export.model.quantized import fake_quant_decoder  # noqa: E402
from lorafast_export.quant.pipeline import quantize_checkpoint  # noqa: E402


def tiny_cpu_vs_cuda(tmp: Path) -> dict:
    from tests.tiny import make_model, save_model

    merged = save_model(make_model("qwen2", hidden=64, heads=4, kv_heads=2, intermediate_size=128, vocab=128),
                        tmp / "tiny")
    calib = torch.randint(0, 128, (16, 64), generator=torch.Generator().manual_seed(0))
    held = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(1))
    out = {}
    for method in ("smoothquant", "gptq", "awq"):
        logits = {}
        for device in ("cpu", "cuda"):
            qm = quantize_checkpoint(merged, {"method": method, "group_size": 32, "device": device}, calib_ids=calib)
            with torch.no_grad():
                logits[device] = fake_quant_decoder(qm)(held)[0]
        out[method] = float((logits["cpu"] - logits["cuda"]).abs().max())
    return out


def llama8b_shape(tmp: Path, layers: int) -> Path:
    from safetensors.torch import save_file

    h, inter, heads, kv, vocab = 4096, 14336, 32, 8, 128256
    d = tmp / "llama8b"
    d.mkdir()
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": h,
           "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
           "num_key_value_heads": kv, "vocab_size": vocab, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
           "max_position_embeddings": 8192, "tie_word_embeddings": False, "torch_dtype": "float16"}
    (d / "config.json").write_text(json.dumps(cfg))
    g = torch.Generator(device="cuda").manual_seed(0)
    rnd = lambda *s: (torch.randn(*s, generator=g, device="cuda") * 0.02).half().cpu()  # noqa: E731
    state = {"model.embed_tokens.weight": rnd(vocab, h), "lm_head.weight": rnd(vocab, h),
             "model.norm.weight": torch.ones(h, dtype=torch.float16)}
    for i in range(layers):
        p = f"model.layers.{i}."
        state |= {p + "input_layernorm.weight": torch.ones(h, dtype=torch.float16),
                  p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.float16),
                  p + "self_attn.q_proj.weight": rnd(h, h), p + "self_attn.k_proj.weight": rnd(kv * 128, h),
                  p + "self_attn.v_proj.weight": rnd(kv * 128, h), p + "self_attn.o_proj.weight": rnd(h, h),
                  p + "mlp.gate_proj.weight": rnd(inter, h), p + "mlp.up_proj.weight": rnd(inter, h),
                  p + "mlp.down_proj.weight": rnd(h, inter)}
    save_file(state, str(d / "model.safetensors"))
    return d


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--methods", nargs="+", default=["gptq", "awq"])
    ap.add_argument("--skip-tiny", action="store_true")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        if not a.skip_tiny:
            print("tiny model, max |logits cpu - cuda|:", json.dumps(tiny_cpu_vs_cuda(tmp)), flush=True)
        merged = llama8b_shape(tmp, a.layers)
        calib = torch.randint(0, 128256, (a.samples, a.seq_len), generator=torch.Generator().manual_seed(0))
        for method in a.methods:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            quantize_checkpoint(merged, {"method": method, "device": "cuda"}, calib_ids=calib,
                                progress=lambda m, t0=t0: print(f"  {m} at {time.perf_counter() - t0:.1f}s",
                                                                flush=True))
            torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            print(f"{method}: {dt:.1f}s for {a.layers} layers = {dt / a.layers:.1f}s/layer; 32 layers ~ "
                  f"{dt / a.layers * 32 / 60:.1f} min; peak GPU memory "
                  f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB", flush=True)


if __name__ == "__main__":
    main()
