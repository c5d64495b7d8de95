"""Benchmark: our OpenVINO artifact vs optimum-intel's own export of the same merged model (not run by the tests).

    # optimum-intel in its own venv (it pins transformers < 5.6, which our stack does not allow)
    python -m venv /tmp/oi && /tmp/oi/bin/pip install torch==2.13.0 'optimum-intel[openvino]==2.2.0' \
        'transformers<5.6' nncf==3.4.0 && /tmp/oi/bin/pip uninstall -y torchvision  # a torch-2.13-incompatible
        # torchvision gets pulled in and breaks `from transformers import AutoProcessor`
    python bench/ov_bench.py --model MERGED_DIR --oi-python /tmp/oi/bin/python --out /tmp/ovbench
    python bench/ov_bench.py --synthetic --oi-python /tmp/oi/bin/python --out /tmp/ovbench   # random llama

Artifacts (same merged fp32 checkpoint; decoder linears int4 asymmetric group 128, lm_head int8 per channel):
  ours   lorafast-export's codes lowered by target openvino (embeddings stay f32): RTN, and GPTQ with act-order
         on the calibration text (Hessians from one fp pass: a bench shortcut for the pipeline's layer walk)
  oi     optimum-intel: OVModelForCausalLM export + NNCF int4 with AWQ and scale estimation on calibration text
         (NNCF's default backup precision puts lm_head and embeddings in int8)
Each artifact is measured in a fresh process (peak RSS = that process's ru_maxrss) with openvino-genai from this
venv and the runtime's default precision (what a user gets): prefill tok/s = prompt / TTFT, decode tok/s = 1 / TPOT.
ContinuousBatchingPipeline: 8 prompts at once, new tokens / wall second. KL: mean per-token KL(reference ‖ artifact)
of next-token distributions on the eval tokens; reference = the canonical decoder on the merged fp32 checkpoint.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

OI_EXPORT = r"""
import json, sys
from optimum.intel import OVModelForCausalLM, OVWeightQuantizationConfig
from optimum.exporters.openvino.convert import export_tokenizer
from transformers import AutoTokenizer
src, dst, texts = sys.argv[1], sys.argv[2], json.load(open(sys.argv[3]))
qc = OVWeightQuantizationConfig(bits=4, sym=False, group_size=128, ratio=1.0, quant_method="awq",
                                scale_estimation=True, dataset=texts, tokenizer=src, num_samples=len(texts),
                                group_size_fallback="adjust")  # NNCF refuses in_features % 128 != 0 otherwise
model = OVModelForCausalLM.from_pretrained(src, export=True, quantization_config=qc, compile=False)
model.save_pretrained(dst)
tok = AutoTokenizer.from_pretrained(src)
tok.save_pretrained(dst)
export_tokenizer(tok, dst)
"""


def synthetic_model(out: Path, hidden: int, layers: int, vocab: int) -> Path:
    """A random llama (no hub access here) with a character tokenizer padded with filler tokens to `vocab`."""
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 11 // 4 // 128 * 128,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=max(1, hidden // 256),
        max_position_embeddings=4096,
    )
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(
                1.0 + 0.1 * torch.randn_like(p)
                if "norm" in name
                else torch.randn_like(p) * p.shape[-1] ** -0.5
            )
    model.save_pretrained(out)
    chars = [chr(c) for c in range(33, 127)]
    vocab_map = {
        t: i
        for i, t in enumerate(["<unk>", "<s>", "</s>", *chars, *[f"<f{i}>" for i in range(vocab)]][:vocab])
    }
    tok = Tokenizer(models.BPE(vocab=vocab_map, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    ).save_pretrained(out)
    return out


def quantize_rtn_model(model_dir: Path, bits: int, group_size: int):
    from lorafast_export.model.quantized import QuantizedModel
    from lorafast_export.model.spec import linear_module_names
    from lorafast_export.quant.rtn import quantize_rtn
    from lorafast_export.weights import open_model

    md = open_model(model_dir)
    fp = {k: md.store.get(k).float() for k in md.store.keys()}
    q = {
        m: quantize_rtn(
            fp.pop(f"{m}.weight"), bits, group_size, symmetric=False, bias=fp.pop(f"{m}.bias", None)
        )
        for i in range(md.config.num_layers)
        for m in linear_module_names(i)
    }
    head = "model.embed_tokens.weight" if md.config.tie_word_embeddings else fp.pop("lm_head.weight")
    q["lm_head"] = quantize_rtn(fp[head] if isinstance(head, str) else head, 8, -1, symmetric=False)
    return QuantizedModel(md.config, fp, q, {"method": "rtn", "bits": bits, "group_size": group_size})


def quantize_gptq_model(model_dir: Path, calib: list[str], bits: int, group_size: int):
    """GPTQ (act-order, asymmetric) from Hessians of the fp model's linear inputs on the calibration text. A bench
    shortcut: all Hessians come from the fp model in one pass (the pipeline's walk is sequential, layer by layer)."""
    import torch
    import transformers

    from lorafast_export.model.decoder import load_decoder
    from lorafast_export.quant.gptq import accumulate_hessian, gptq_quantize
    from lorafast_export.weights import open_model

    qm = quantize_rtn_model(model_dir, bits, group_size)  # fp tensors + the int8 lm_head
    dec = load_decoder(open_model(model_dir))
    hess: dict[str, tuple] = {}
    hooks = []
    for i, layer in enumerate(dec.model.layers):
        for rel, lin in layer.linears().items():

            def hook(mod, inp, out, name=f"model.layers.{i}.{rel}"):
                hess[name] = accumulate_hessian(*hess.get(name, (None, 0)), inp[0])

            hooks.append(lin.register_forward_hook(hook))
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    with torch.no_grad():
        for text in calib:
            dec(torch.tensor([tok(text)["input_ids"][:256]]))
    for h in hooks:
        h.remove()
    md = open_model(model_dir)
    for name in hess:
        w = md.store.get(f"{name}.weight").float()
        qm.q[name] = gptq_quantize(
            w, hess[name][0], bits, group_size, symmetric=False, act_order=True, bias=qm.q[name].bias
        )
    qm.settings["method"] = "gptq"
    return qm


def build_ours(model_dir: Path, out: Path, calib: list[str] | None = None) -> Path:
    from types import SimpleNamespace

    from lorafast_export.targets.registry import LowerInput, get_target
    from lorafast_export.weights import open_model

    recipe = SimpleNamespace(target=SimpleNamespace(name="openvino", dtype="auto", options={}))
    qm = (
        quantize_rtn_model(model_dir, 4, 128)
        if calib is None
        else quantize_gptq_model(model_dir, calib, 4, 128)
    )
    get_target("openvino").lower(LowerInput(model_dir, open_model(model_dir).config, recipe, qm), out)
    return out


def build_oi(model_dir: Path, out: Path, oi_python: str, texts: list[str]) -> Path:
    with tempfile.TemporaryDirectory() as tmp:
        script, data = Path(tmp) / "export.py", Path(tmp) / "texts.json"
        script.write_text(OI_EXPORT)
        data.write_text(json.dumps(texts))
        subprocess.run([oi_python, str(script), str(model_dir), str(out), str(data)], check=True)
    return out


def measure(model_dir: Path, prompt: list[int], new_tokens: int, n_batch: int, repeats: int = 3) -> dict:
    """Run in a fresh process (no torch imported): LLMPipeline prefill/decode speed and peak RSS, then CB
    throughput (its 1 GB paged KV cache is allocated after the RSS reading). Best of `repeats` after a warm-up."""
    import numpy as np
    import openvino as ov
    import openvino_genai as og

    def greedy(n: int):
        gc = og.GenerationConfig()
        gc.max_new_tokens = gc.min_new_tokens = n
        gc.ignore_eos, gc.do_sample, gc.apply_chat_template = True, False, False
        return gc

    def rotated(i: int):  # a different prompt per run: no prefix-cache hits
        return ov.Tensor(np.asarray([prompt[i:] + prompt[:i]], dtype=np.int64))

    pipe = og.LLMPipeline(str(model_dir), "CPU")
    pipe.generate(rotated(len(prompt) // 2), greedy(4))  # warm-up
    runs = [pipe.generate(rotated(7 * (i + 1)), greedy(new_tokens)).perf_metrics for i in range(repeats)]
    ttft_ms = min(pm.get_ttft().mean for pm in runs)
    tpot_ms = min(pm.get_tpot().mean for pm in runs)
    rss_mb = peak_rss_mb()
    del pipe
    sc = og.SchedulerConfig()
    sc.cache_size, sc.max_num_seqs = 1, n_batch
    cb = og.ContinuousBatchingPipeline(str(model_dir), sc, "CPU", {})
    cb.generate([rotated(3 * i + 1) for i in range(n_batch)], [greedy(4)] * n_batch)  # warm-up
    cb_s = []
    for r in range(repeats):
        prompts = [rotated(11 * (r * n_batch + i) + 5) for i in range(n_batch)]
        t = time.perf_counter()
        cb.generate(prompts, [greedy(new_tokens)] * n_batch)
        cb_s.append(time.perf_counter() - t)
    return {
        "prefill_tok_s": len(prompt) / (ttft_ms / 1000),
        "decode_tok_s": 1000 / tpot_ms,
        "cb_tok_s": n_batch * new_tokens / min(cb_s),
        "peak_rss_mb": rss_mb,
    }


def peak_rss_mb() -> float:
    """VmHWM of this process (ru_maxrss would carry the parent's peak over fork + exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def kl_vs_reference(model_dir: Path, eval_ids, ref_logits, precision: str) -> float:
    from lorafast_export.targets.openvino.session import OVSession

    got = OVSession(model_dir, "cpu", precision).logits(eval_ids)
    p, q = ref_logits.double().log_softmax(-1), got.double().log_softmax(-1)
    return (p.exp() * (p - q)).sum(-1).mean().item()


def eval_tokens(model_dir: Path, text_file: Path | None, n: int, seq: int, calib_file: Path | None = None):
    """([n, seq] eval token ids, calibration texts for NNCF: calib_file's, else from the eval text's tail)."""
    import torch
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    text = text_file.read_text() if text_file and text_file.exists() else None
    if text is None:  # no eval text: random tokens, and random "words" as calibration text
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(3, tok.vocab_size, (n, seq), generator=g)
        return ids, [tok.decode(torch.randint(3, 97, (seq,), generator=g)) for _ in range(32)]
    ids = torch.tensor(tok(text)["input_ids"][: n * seq]).view(n, seq)
    calib = calib_file.read_text() if calib_file and calib_file.exists() else text[len(text) // 2 :]
    chunk = max(1, len(calib) // 32)
    return ids, [calib[i * chunk : (i + 1) * chunk] for i in range(32)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="merged HF checkpoint (with tokenizer)")
    ap.add_argument("--synthetic", action="store_true", help="build a random llama instead of --model")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--oi-python", help="python of the optimum-intel venv; omitted: only our artifact")
    ap.add_argument("--eval-text", type=Path, default=REPO / "lorafast_export/data/text/prose_eval.txt")
    ap.add_argument("--calib-text", type=Path, default=REPO / "lorafast_export/data/text/calib.txt")
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--out", type=Path, default=Path("/tmp/ovbench"))
    ap.add_argument("--reuse", action="store_true", help="keep artifacts already built under --out")
    ap.add_argument("--rounds", type=int, default=3, help="measurement rounds per artifact, alternating")
    ap.add_argument("--measure", type=Path, help=argparse.SUPPRESS)  # internal: child process
    args = ap.parse_args()
    if args.measure:
        prompt = json.loads(Path(args.measure / "bench_prompt.json").read_text())
        print(json.dumps(measure(args.measure, prompt, args.new_tokens, args.batch)))
        return
    run(args)


def run(args) -> None:
    import torch

    from lorafast_export.model.decoder import load_decoder
    from lorafast_export.weights import open_model

    args.out.mkdir(parents=True, exist_ok=True)
    model_dir = args.model or args.out / "merged"
    if not args.model and not (args.reuse and (model_dir / "config.json").exists()):
        synthetic_model(model_dir, args.hidden, args.layers, args.vocab)
    eval_ids, calib = eval_tokens(
        model_dir, None if args.synthetic else args.eval_text, 4, 128, args.calib_text
    )
    with torch.no_grad():
        ref_logits, _ = load_decoder(open_model(model_dir))(eval_ids)
    artifacts = {
        "ours int4 RTN g128": lambda d: build_ours(model_dir, d),
        "ours int4 GPTQ act-order g128": lambda d: build_ours(model_dir, d, calib),
    }
    if args.oi_python:
        artifacts["optimum-intel int4 (NNCF AWQ+SE g128)"] = lambda d: build_oi(
            model_dir, d, args.oi_python, calib
        )
    prompt = eval_ids.flatten()[: args.prompt_len].tolist()
    built = {}
    for name, build in artifacts.items():
        d = args.out / re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
        t = time.perf_counter()
        if not (args.reuse and (d / "openvino_model.xml").exists()):
            build(d)
        (d / "bench_prompt.json").write_text(json.dumps(prompt))
        built[name] = (
            d,
            {
                "build_s": time.perf_counter() - t,
                "size_mb": sum(f.stat().st_size for f in d.glob("openvino_model.*")) / 2**20,
                "kl_default": kl_vs_reference(d, eval_ids, ref_logits, "default"),
                "kl_f32": kl_vs_reference(d, eval_ids, ref_logits, "f32"),
            },
        )
    for _ in range(args.rounds):  # alternate artifacts; keep each one's best round (the machine is shared)
        for d, m in built.values():
            child = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--measure",
                    str(d),
                    "--new-tokens",
                    str(args.new_tokens),
                    "--batch",
                    str(args.batch),
                ],
                check=True,
                capture_output=True,
                text=True,
            )
            got = json.loads(child.stdout.strip().splitlines()[-1])
            for k, v in got.items():
                better = min if k == "peak_rss_mb" else max
                m[k] = better(m.get(k, v), v)
    rows = [(name, m) for name, (_, m) in built.items()]
    print(table(rows, model_dir, args))


def table(rows, model_dir: Path, args) -> str:
    cfg = json.loads((model_dir / "config.json").read_text())
    head = (
        f"model: {cfg.get('model_type')} hidden {cfg['hidden_size']} layers {cfg['num_hidden_layers']} vocab "
        f"{cfg['vocab_size']}; prompt {args.prompt_len}, {args.new_tokens} new tokens, CB batch {args.batch}\n\n"
    )
    cols = [
        "artifact",
        "IR MB",
        "prefill tok/s",
        "decode tok/s",
        f"CB x{args.batch} tok/s",
        "peak RSS MB",
        "KL default",
        "KL f32",
        "build s",
    ]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for name, m in rows:
        lines.append(
            f"| {name} | {m['size_mb']:.0f} | {m['prefill_tok_s']:.0f} | {m['decode_tok_s']:.1f} | "
            f"{m['cb_tok_s']:.1f} | {m['peak_rss_mb']:.0f} | {m['kl_default']:.2e} | {m['kl_f32']:.2e} | "
            f"{m['build_s']:.0f} |"
        )
    return head + "\n".join(lines)


if __name__ == "__main__":
    main()
