#!/usr/bin/env python
"""Benchmark: our onnxruntime artifact vs onnxruntime-genai's own model builder vs transformers eager.

For one merged model (a random ~300M Llama, the demo model merged with its LoRA, or any HF directory):

    ours-fp32        lorafast-export target onnxruntime, unquantized
    ours-int4        quant rtn 4-bit g32 symmetric, lm_head too (= the builder's int4 defaults), accuracy_level 4
    ours-int4-exact  the same codes, accuracy_level 0 (activations stay fp32: the validated default)
    ours-int4-asym   quant rtn 4-bit g32 asymmetric (our rtn default), lm_head too, accuracy_level 4
    builder-fp32     python -m onnxruntime_genai.models.builder -p fp32 -e cpu
    builder-int4     python -m onnxruntime_genai.models.builder -p int4 -e cpu (RTN, block 32, sym, acc. level 4)
    transformers     AutoModelForCausalLM fp32, eager, model.generate

Every run happens in its own process pinned to the same cores (peak RSS = that process's VmHWM), the variants
taken round-robin for --rounds passes, best time kept (the machine may be shared); then all onnxruntime
variants once more in ONE process, alternating run by run (--interleave), medians reported. Prefill tok/s = prompt tokens / time of the prompt's forward (og: append_tokens), decode tok/s = new tokens /
time of the decode loop (og: generate_next_token), greedy. Accuracy: KL(fp32 transformers ‖ backend) per
token over one eval sequence, and the same-top-1 rate, through plain onnxruntime for the ONNX artifacts.

    python bench/ort_bench.py --model random300m --work /tmp/ortbench
    python bench/ort_bench.py --model demo --work /tmp/ortbench-demo
    python bench/ort_bench.py --model /path/to/merged --work /tmp/x --prompt 512 --new 128

Artifacts are cached under --work (delete a folder to rebuild it). Not part of the test run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
VARIANTS = [
    "transformers",
    "builder-fp32",
    "ours-fp32",
    "builder-int4",
    "ours-int4",
    "ours-int4-exact",
    "ours-int4-asym",
]
INT4 = {  # variant → (quant settings, MatMulNBits accuracy_level)
    "ours-int4": ({"symmetric": True}, 4),
    "ours-int4-exact": ({"symmetric": True}, 0),
    "ours-int4-asym": ({"symmetric": False}, 4),
}


# ------------------------------------------------------------------------------------------- models


def random_llama(out: Path) -> None:
    """A ~333M-parameter random Llama (hidden 1024, 24 layers, GQA 16/4, vocab 32000) with a word-level tokenizer."""
    import tokenizers
    import torch
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=32000,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=24,
        num_attention_heads=16,
        num_key_value_heads=4,
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(torch.float16)
    model.save_pretrained(out)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 32000)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        model_input_names=["input_ids", "attention_mask"],
    ).save_pretrained(out)


def demo_merged(out: Path, demo_dir: Path) -> None:
    """The bundled demo base with its LoRA merged (what `build --target onnxruntime` lowers by default)."""
    from lorafast_export.adapters import open_adapter
    from lorafast_export.merge import merge
    from lorafast_export.weights import open_model

    merge(open_model(demo_dir / "base"), [open_adapter(f"{demo_dir / 'lora'}:1.0")], out, dtype="float32")


def prepare_merged(model: str, work: Path, demo_dir: Path) -> Path:
    if model not in ("random300m", "demo"):
        return Path(model)
    merged = work / "merged"
    if not (merged / "config.json").exists():
        shutil.rmtree(merged, ignore_errors=True)
        random_llama(merged) if model == "random300m" else demo_merged(merged, demo_dir)
    return merged


# ---------------------------------------------------------------------------------------- artifacts


def quantize_int4(merged: Path, symmetric: bool):
    from lorafast_export.quant.walk import quantize_checkpoint

    return quantize_checkpoint(
        merged,
        {
            "method": "rtn",
            "bits": 4,
            "group_size": 32,
            "symmetric": symmetric,
            "quantize_lm_head": True,
            "device": "cpu",
        },
    )  # the builder's int4 does too


def build_ours(merged: Path, out: Path, qm, accuracy_level: int) -> None:
    from lorafast_export.recipe import Recipe
    from lorafast_export.targets.registry import LowerInput, get_target
    from lorafast_export.weights import open_model

    recipe = Recipe().with_overrides(
        {
            "target.name": "onnxruntime",
            "target.dtype": "float32",
            "target.options": {"accuracy_level": accuracy_level},
        }
    )
    get_target("onnxruntime").lower(LowerInput(merged, open_model(merged).config, recipe, qm), out)


def build_builder(merged: Path, out: Path, precision: str, work: Path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "onnxruntime_genai.models.builder",
        "-i",
        str(merged),
        "-o",
        str(out),
        "-p",
        precision,
        "-e",
        "cpu",
        "-c",
        str(work / "builder-cache"),
    ]
    log = out.with_suffix(".log")
    with open(log, "w") as f:
        if subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode:
            sys.exit(f"the model builder failed; see {log}")


def build_all(merged: Path, work: Path, variants: list[str]) -> None:
    qms: dict[bool, object] = {}
    for v in variants:
        out = work / v
        if v == "transformers" or (out / "genai_config.json").exists():
            continue
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        if v == "ours-fp32":
            build_ours(merged, out, None, 0)
        elif v in INT4:
            quant, level = INT4[v]
            sym = quant["symmetric"]
            qms[sym] = qms.get(sym) or quantize_int4(merged, sym)
            build_ours(merged, out, qms[sym], level)
        else:
            build_builder(merged, out, v.removeprefix("builder-"), work)
        print(f"built {v} in {time.perf_counter() - t0:.0f}s", file=sys.stderr)


# --------------------------------------------------------------------------------------------- runs


def eval_ids(merged: Path, vocab: int, n: int, offset: int) -> np.ndarray:
    """n tokens of real text (Python's argparse.py through the model's tokenizer) when the model has a
    subword tokenizer; random ids for the random model (its word-level tokenizer knows no text)."""
    tok_file = merged / "tokenizer.json"
    if tok_file.exists() and json.loads(tok_file.read_text())["model"]["type"] != "WordLevel":
        import argparse as text_source

        import tokenizers

        ids = tokenizers.Tokenizer.from_file(str(tok_file)).encode(Path(text_source.__file__).read_text()).ids
        if len(ids) >= offset + n:
            return np.asarray([ids[offset : offset + n]], dtype=np.int64)
    return np.random.default_rng(offset).integers(3, vocab, size=(1, n), dtype=np.int64)


def peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM; ru_maxrss would carry the forking parent's peak over)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def og_model(art: Path, threads: int):
    """An onnxruntime-genai model of the artifact directory, with `threads` intra-op threads."""
    import onnxruntime_genai as og

    config = og.Config(str(art))
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
    return og.Model(config)


def timed_generation(model, prompt: np.ndarray, new: int) -> tuple[float, float]:
    """(prefill s, decode s) of one greedy generation: `prompt` [1, n] appended, then `new` tokens."""
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    total = prompt.shape[1] + new
    params.set_search_options(do_sample=False, max_length=total, min_length=total)
    gen = og.Generator(model, params)
    t0 = time.perf_counter()
    gen.append_tokens(prompt.astype(np.int32))
    t1 = time.perf_counter()
    for _ in range(new):
        gen.generate_next_token()
    return t1 - t0, time.perf_counter() - t1


def run_og(art: Path, prompt: np.ndarray, new: int, trials: int, threads: int) -> dict:
    """Best of `trials` (the machine may be shared: the best run is the least disturbed one)."""
    model = og_model(art, threads)
    prefill, decode = zip(*(timed_generation(model, prompt, new) for _ in range(trials)), strict=True)
    return {
        "prefill_tok_s": prompt.shape[1] / min(prefill),
        "decode_tok_s": new / min(decode),
        "peak_rss_mb": peak_rss_mb(),
    }


def run_interleaved(
    work: Path, variants: list[str], prompt: np.ndarray, new: int, reps: int, threads: int
) -> dict:
    """All og variants loaded in one process, runs alternated A, B, C, A, B, C, ...: a busy spell on a shared
    machine then slows every variant alike, so the medians compare the graphs rather than the moments."""
    import statistics

    models = {v: og_model(work / v, threads) for v in variants}
    times: dict[str, list] = {v: [] for v in variants}
    for _ in range(reps):
        for v, model in models.items():
            prefill_s, decode_s = timed_generation(model, prompt, new)
            times[v].append((prompt.shape[1] / prefill_s, new / decode_s))
    return {
        v: {
            "prefill_median": statistics.median(t[0] for t in ts),
            "prefill_max": max(t[0] for t in ts),
            "decode_median": statistics.median(t[1] for t in ts),
            "decode_max": max(t[1] for t in ts),
        }
        for v, ts in times.items()
    }


def ort_logits(art: Path, ids: np.ndarray, threads: int) -> np.ndarray:
    """Prefill logits through plain onnxruntime for any genai-style decoder (ours or the builder's)."""
    import onnxruntime as ort

    cfg = json.loads((art / "genai_config.json").read_text())["model"]["decoder"]
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(art / cfg["filename"]), so, providers=["CPUExecutionProvider"])
    feeds = {}
    for i in sess.get_inputs():
        if i.name == "input_ids":
            feeds[i.name] = ids
        elif i.name == "attention_mask":
            feeds[i.name] = np.ones_like(ids)
        elif i.name == "position_ids":
            feeds[i.name] = np.arange(ids.shape[1], dtype=np.int64)[None]
        elif i.name.startswith("past_key_values"):
            dtype = np.float16 if "float16" in i.type else np.float32
            feeds[i.name] = np.zeros((1, cfg["num_key_value_heads"], 0, cfg["head_size"]), dtype)
        else:
            raise SystemExit(f"{art}: unexpected model input {i.name}")
    return sess.run(["logits"], feeds)[0].astype(np.float32)


def run_transformers(merged: Path, prompt: np.ndarray, new: int, ids: np.ndarray) -> tuple[dict, np.ndarray]:
    """Eager fp32: prefill the prompt, then `new` greedy single-token steps on its KV cache."""
    import torch
    import transformers

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    model = transformers.AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    with torch.no_grad():
        t0 = time.perf_counter()
        out = model(input_ids=torch.from_numpy(prompt), use_cache=True)
        t1 = time.perf_counter()
        for _ in range(new):
            tok = out.logits[:, -1:].argmax(-1)
            out = model(input_ids=tok, past_key_values=out.past_key_values, use_cache=True)
        t2 = time.perf_counter()
        stats = {
            "prefill_tok_s": prompt.shape[1] / (t1 - t0),
            "decode_tok_s": new / (t2 - t1),
            "peak_rss_mb": peak_rss_mb(),
        }
        logits = model(input_ids=torch.from_numpy(ids)).logits.float().numpy()
    return stats, logits


def accuracy(ref: np.ndarray, out: np.ndarray) -> dict:
    def log_softmax(x):
        x = x.astype(np.float64)
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    lr, lo = log_softmax(ref[0]), log_softmax(out[0])
    kl = (np.exp(lr) * (lr - lo)).sum(-1)
    return {
        "kl_mean": float(kl.mean()),
        "kl_max": float(kl.max()),
        "top1": float((ref[0].argmax(-1) == out[0].argmax(-1)).mean()),
        "max_abs": float(np.abs(ref - out).max()),
    }


def run_one(
    variant: str, work: Path, merged: Path, prompt_len: int, new: int, trials: int, threads: int
) -> None:
    """Child process: one variant's speed, memory and accuracy, printed as one JSON line."""
    vocab = json.loads((merged / "config.json").read_text())["vocab_size"]
    prompt, ids = eval_ids(merged, vocab, prompt_len, 0), eval_ids(merged, vocab, 128, prompt_len)
    ref_path = work / "ref_logits.npy"
    if variant.startswith("interleaved:"):
        variants = variant.removeprefix("interleaved:").split(",")
        return print(json.dumps(run_interleaved(work, variants, prompt, new, trials, threads)))
    if variant == "transformers":
        stats, logits = run_transformers(merged, prompt, new, ids)
        np.save(ref_path, logits)
    else:
        stats = run_og(work / variant, prompt, new, trials, threads)
        logits = ort_logits(work / variant, ids, threads)
    stats.update(accuracy(np.load(ref_path), logits))
    art = work / variant
    stats["disk_mb"] = (
        sum(f.stat().st_size for f in art.iterdir() if f.suffix in (".onnx", ".data"))
        if art.exists()
        else sum(f.stat().st_size for f in merged.glob("*.safetensors"))
    ) / 2**20
    print(json.dumps({"variant": variant, **stats}))


# ------------------------------------------------------------------------------------------- report


def table(rows: list[dict], title: str) -> str:
    head = (
        "| backend | prefill tok/s | decode tok/s | peak RSS MB | weights on disk MB | KL mean vs fp32 | "
        "KL max | same top-1 |\n|---|---:|---:|---:|---:|---:|---:|---:|"
    )
    lines = [f"### {title}", "", head]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['prefill_tok_s']:.1f} | {r['decode_tok_s']:.1f} | {r['peak_rss_mb']:.0f} | "
            f"{r['disk_mb']:.0f} | {r['kl_mean']:.2e} | {r['kl_max']:.2e} | {r['top1']:.3f} |"
        )
    return "\n".join(lines)


def run_child(a, merged: Path, run: str, trials: int) -> dict:
    """One `--run` of this script in its own process pinned to a.cores; its last stdout line (JSON) is the row."""
    cmd = ["taskset", "-c", a.cores, sys.executable, __file__, "--model", str(merged), "--work", str(a.work)]
    cmd += [
        "--prompt",
        str(a.prompt),
        "--new",
        str(a.new),
        "--trials",
        str(trials),
        "--threads",
        str(a.threads),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads)}
    out = subprocess.run([*cmd, "--run", run], capture_output=True, text=True, env=env)
    if out.returncode:
        sys.exit(f"{run} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--model", default="random300m", help="random300m | demo | path of a merged HF checkpoint"
    )
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--prompt", type=int, default=256, help="prompt tokens (prefill)")
    ap.add_argument("--new", type=int, default=64, help="generated tokens (decode)")
    ap.add_argument(
        "--demo-dir",
        type=Path,
        default=REPO / "lorafast_export" / "data" / "demo",
        help="folder with the demo's base/ and lora/ (for --model demo)",
    )
    ap.add_argument(
        "--trials", type=int, default=2, help="og runs per variant and round; the best is reported"
    )
    ap.add_argument("--rounds", type=int, default=3, help="round-robin passes over the variants")
    ap.add_argument(
        "--interleave",
        type=int,
        default=8,
        help="runs per og variant in the interleaved comparison (0: skip it)",
    )
    ap.add_argument("--cores", default="0,1", help="CPU cores every run is pinned to (taskset -c)")
    ap.add_argument(
        "--threads", type=int, default=2, help="intra-op threads of every backend (torch, onnxruntime)"
    )
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--run", help=argparse.SUPPRESS)  # internal: child process for one variant
    a = ap.parse_args()
    sys.path.insert(0, str(REPO))
    a.work.mkdir(parents=True, exist_ok=True)
    merged = prepare_merged(a.model, a.work, a.demo_dir)
    if a.run:
        return run_one(a.run, a.work, merged, a.prompt, a.new, a.trials, a.threads)
    variants = a.variants.split(",")
    build_all(merged, a.work, variants)
    if "transformers" in variants:  # reference logits first
        variants = ["transformers"] + [v for v in variants if v != "transformers"]
    best: dict[str, dict] = {}
    for r in range(a.rounds):  # round-robin: a busy spell on a shared machine hits every variant alike
        for v in variants:
            if v == "transformers" and r:
                continue  # slow, and only the reference
            row = run_child(a, merged, v, a.trials)
            print(json.dumps(row), file=sys.stderr)
            prev = best.setdefault(v, row)
            for k in ("prefill_tok_s", "decode_tok_s"):
                prev[k] = max(prev[k], row[k])
            prev["peak_rss_mb"] = max(prev["peak_rss_mb"], row["peak_rss_mb"])
    rows = [best[v] for v in variants]
    og_variants = [v for v in variants if v != "transformers"]
    inter = {}
    if a.interleave and len(og_variants) > 1:
        inter = run_child(a, merged, "interleaved:" + ",".join(og_variants), a.interleave)
    print(
        table(
            rows,
            f"{a.model}: prompt {a.prompt} tokens, {a.new} new tokens, cores {a.cores}, "
            f"{a.threads} thread(s), best of {a.rounds}x{a.trials} runs, one process per run",
        )
    )
    if inter:
        print(
            f"\n### interleaved in one process ({a.interleave} runs each, alternating)\n\n"
            "| backend | prefill tok/s median | max | decode tok/s median | max |\n|---|---:|---:|---:|---:|"
        )
        for v, r in inter.items():
            print(
                f"| {v} | {r['prefill_median']:.1f} | {r['prefill_max']:.1f} | {r['decode_median']:.1f} | "
                f"{r['decode_max']:.1f} |"
            )


if __name__ == "__main__":
    main()
