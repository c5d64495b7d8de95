#!/usr/bin/env python
"""Build the bundled demo model: a tiny Llama base plus a LoRA and a DoRA adapter.

Everything is derived from text that ships with CPython itself (PSF License 2.0):

* domain "prose": ``pydoc_data.topics.topics`` (the language-reference topics used by ``help()``);
  the BASE model is trained on it;
* domain "code": the Python source of a fixed list of pure-Python standard-library modules;
  the ADAPTERS are fine-tuned on it.

Outputs (all under ``lorafast_export/data/`` unless ``--out`` is given):

* ``text/{prose_eval,code_eval,calib}.txt``, ``text/prompts.jsonl``, ``text/SOURCES.md``
* ``demo/base/``  - tokenizer + ``LlamaForCausalLM`` (float16 safetensors)
* ``demo/lora/``  - PEFT LoRA adapter (r=16, alpha=32, all linear projections)
* ``demo/dora/``  - PEFT DoRA adapter (same, ``use_dora=True``)
* ``demo/PERPLEXITY.md`` - held-out perplexities of base / base+LoRA / base+DoRA
* ``demo/README.md``

Usage::

    python scripts/train_demo.py            # ~12-15 min on 2 idle CPU cores

The run is deterministic for a given CPython stdlib version, torch build and thread count.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shutil
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "lorafast_export" / "data"

# --------------------------------------------------------------------------------------------
# Fixed experiment definition
# --------------------------------------------------------------------------------------------

SEED = 1234
NUM_THREADS = 2

# Pure-Python stdlib modules (files ``<stdlib>/<name>.py``), sorted.  ~1.8 MB in CPython 3.11.
CODE_MODULES = sorted(
    [
        "argparse",
        "ast",
        "base64",
        "bdb",
        "calendar",
        "cmd",
        "codecs",
        "configparser",
        "contextlib",
        "copy",
        "csv",
        "dataclasses",
        "datetime",
        "difflib",
        "dis",
        "enum",
        "fractions",
        "functools",
        "gettext",
        "glob",
        "gzip",
        "heapq",
        "inspect",
        "ipaddress",
        "mimetypes",
        "optparse",
        "os",
        "pathlib",
        "pickle",
        "posixpath",
        "pprint",
        "queue",
        "random",
        "shlex",
        "shutil",
        "statistics",
        "string",
        "subprocess",
        "tarfile",
        "tempfile",
        "textwrap",
        "threading",
        "tokenize",
        "traceback",
        "typing",
        "uuid",
        "warnings",
        "weakref",
        "zipfile",
    ]
)
# Whole modules held out for evaluation (never seen by tokenizer, base or adapters).
CODE_HELDOUT = ["heapq", "queue", "shlex", "textwrap"]
# Prose topics (sorted keys of pydoc_data.topics.topics) with index % 8 == 1 are held out.
PROSE_HOLDOUT_MOD, PROSE_HOLDOUT_REM = 8, 1

CALIB_CHARS = 60_000
CALIB_CHUNK = 1_500

PROMPTS = [
    "The import statement",
    "A class definition defines",
    "When an exception is raised",
    "The for statement is used to",
    "def __init__(self",
    "import os\nimport sys\n\n",
    "class Error(Exception):\n",
    "    for i in range(",
]

VOCAB_SIZE = 2048
SPECIAL_TOKENS = ["<s>", "</s>", "<pad>"]  # ids 0, 1, 2
SEQ_LEN = 256

BASE_NAME = "lorafast-export-demo-base"
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def stdlib_dir() -> Path:
    return Path(os.path.dirname(os.__file__))


def load_prose() -> tuple[list[str], list[str]]:
    from pydoc_data.topics import topics

    train, held = [], []
    for i, key in enumerate(sorted(topics)):
        text = topics[key].strip("\n") + "\n"
        (held if i % PROSE_HOLDOUT_MOD == PROSE_HOLDOUT_REM else train).append(text)
    return train, held


def load_code() -> tuple[list[str], list[str], dict[str, str]]:
    train, held, digests = [], [], {}
    for name in CODE_MODULES:
        path = stdlib_dir() / f"{name}.py"
        raw = path.read_bytes()
        digests[name] = hashlib.sha256(raw).hexdigest()
        text = raw.decode("utf-8").replace("\r\n", "\n")
        (held if name in CODE_HELDOUT else train).append(text)
    return train, held, digests


def make_calib(prose_train: list[str], code_train: list[str]) -> str:
    """~60 KB of line-aligned chunks taken at evenly spaced offsets, alternating prose / code."""

    def chunks(docs: list[str], n: int) -> list[str]:
        corpus = "\n".join(docs)
        out = []
        for k in range(n):
            start = (len(corpus) * k) // n
            start = corpus.find("\n", start) + 1  # align to a line start
            end = corpus.rfind("\n", start, start + CALIB_CHUNK) + 1
            piece = corpus[start:end].strip("\n")
            if piece:
                out.append(piece)
        return out

    n = CALIB_CHARS // (2 * CALIB_CHUNK)
    p, c = chunks(prose_train, n), chunks(code_train, n)
    mixed = [x for pair in zip(p, c) for x in pair]
    return "\n\n".join(mixed) + "\n"


def write_text_files(out: Path, data: dict) -> None:
    tdir = out / "text"
    tdir.mkdir(parents=True, exist_ok=True)
    (tdir / "prose_eval.txt").write_text(data["prose_eval"], encoding="utf-8")
    (tdir / "code_eval.txt").write_text(data["code_eval"], encoding="utf-8")
    (tdir / "calib.txt").write_text(data["calib"], encoding="utf-8")
    with open(tdir / "prompts.jsonl", "w", encoding="utf-8") as f:
        for p in PROMPTS:
            f.write(json.dumps({"prompt": p}) + "\n")

    def kb(name: str) -> str:
        return f"{(tdir / name).stat().st_size / 1000:.1f} KB"

    digests = "\n".join(
        f"| `{n}.py` | {'eval' if n in CODE_HELDOUT else 'train'} | `{d[:16]}` |"
        for n, d in data["code_digests"].items()
    )
    (tdir / "SOURCES.md").write_text(
        f"""# Sources of the bundled text

All text here is taken from **CPython {platform.python_version()}**'s standard library
(Python Software Foundation License Version 2; see https://docs.python.org/3/license.html).
It was produced by `python scripts/train_demo.py` (deterministic; re-running with the same
CPython version gives byte-identical files).

Two domains:

* **prose** - `pydoc_data.topics.topics` ({data["n_prose_topics"]} language-reference topics, the text
  behind `help("assert")` etc.).  Topics are taken in sorted key order; every topic whose index
  `i % {PROSE_HOLDOUT_MOD} == {PROSE_HOLDOUT_REM}` is held out for evaluation, the rest is the train split.
* **code** - the Python source of {len(CODE_MODULES)} pure-Python standard-library modules
  (`Lib/<name>.py`, listed below).  The modules {", ".join(f"`{m}`" for m in CODE_HELDOUT)} are held
  out for evaluation as whole files; the rest is the train split.

| file | content | size |
|---|---|---|
| `prose_eval.txt` | held-out prose topics, concatenated (blank line between topics) | {kb("prose_eval.txt")} |
| `code_eval.txt` | held-out modules, concatenated in sorted order (blank line between files) | {kb("code_eval.txt")} |
| `calib.txt` | {CALIB_CHARS // (2 * CALIB_CHUNK)} prose + {CALIB_CHARS // (2 * CALIB_CHUNK)} code line-aligned chunks (<= {CALIB_CHUNK} chars) from the TRAIN splits, taken at evenly spaced offsets and interleaved prose/code (blank line between chunks); for post-training quantization calibration | {kb("calib.txt")} |
| `prompts.jsonl` | {len(PROMPTS)} short generation prompts, half prose-like, half code-like (written by hand) | {kb("prompts.jsonl")} |

Train-split sizes: prose {data["prose_train_chars"] / 1000:.0f} K chars, code {data["code_train_chars"] / 1000:.0f} K chars.

Code modules (sha256 prefix of the source file that was read):

| file | split | sha256[:16] |
|---|---|---|
{digests}
""",
        encoding="utf-8",
    )


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------


def train_tokenizer(texts: list[str], out_dir: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    assert tok.token_to_id("<s>") == 0 and tok.token_to_id("</s>") == 1 and tok.token_to_id("<pad>") == 2
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A",
        pair="<s> $A <s> $B",
        special_tokens=[("<s>", 0)],
    )
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        model_input_names=["input_ids", "attention_mask"],
        model_max_length=1024,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    hf.save_pretrained(out_dir)
    # transformers 5.x writes ``"tokenizer_class": "TokenizersBackend"``, a class that 4.x does not know;
    # the 4.x/5.x-neutral name loads the very same tokenizer.json in both.
    cfg_path = out_dir / "tokenizer_config.json"
    tcfg = json.loads(cfg_path.read_text())
    tcfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(tcfg, indent=2, sort_keys=True) + "\n")
    return hf


def check_tokenizer(out_dir: Path, samples: list[str]) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out_dir)
    ids = tok("def f(x):\n    return x")["input_ids"]
    assert ids[0] == tok.bos_token_id == 0, f"BOS not prepended: {ids[:5]} ({type(tok).__name__})"
    assert tok.eos_token_id == 1 and tok.pad_token_id == 2
    for s in samples:
        enc = tok(s, add_special_tokens=False)["input_ids"]
        assert tok.decode(enc) == s, "tokenizer does not round-trip"
    log(f"tokenizer OK: {type(tok).__name__}, vocab {len(tok)}, round-trips {len(samples)} samples")


def encode_docs(tok, docs: list[str]) -> torch.Tensor:
    """<s> doc </s> <s> doc </s> ... as one 1-D LongTensor."""
    out: list[int] = []
    for d in docs:
        out.append(tok.bos_token_id)
        out.extend(tok(d, add_special_tokens=False)["input_ids"])
        out.append(tok.eos_token_id)
    return torch.tensor(out, dtype=torch.long)


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def lr_at(step: int, total: int, peak: float, warmup: int, floor: float = 0.1) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    prog = (step - warmup) / max(1, total - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * prog)))


def train_loop(
    model,
    params,
    stream: torch.Tensor,
    *,
    steps: int,
    batch: int,
    lr: float,
    wd: float,
    seed: int,
    tag: str,
    eval_fn=None,
    eval_every: int = 0,
) -> None:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=wd, eps=1e-8)
    warmup = max(1, steps // 20)
    model.train()
    t0 = time.time()
    run_loss = None
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, warmup)
        starts = torch.randint(0, stream.numel() - SEQ_LEN - 1, (batch,), generator=gen)
        x = torch.stack([stream[s : s + SEQ_LEN] for s in starts.tolist()])
        logits = model(input_ids=x).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        run_loss = loss.item() if run_loss is None else 0.9 * run_loss + 0.1 * loss.item()
        if (step + 1) % 25 == 0 or step == 0 or step + 1 == steps:
            el = time.time() - t0
            log(
                f"{tag} step {step + 1}/{steps} loss {loss.item():.3f} (ema {run_loss:.3f}) "
                f"lr {opt.param_groups[0]['lr']:.2e} {el:.0f}s ({el / (step + 1):.2f}s/step)"
            )
        if eval_fn is not None and eval_every and (step + 1) % eval_every == 0 and step + 1 != steps:
            model.eval()
            log(f"{tag} step {step + 1}: {eval_fn(model)}")
            model.train()
    model.eval()


def make_config(**shape):
    """The demo's Llama config; `shape` overrides its vocabulary and widths (scripts/train_fixture.py's larger fixture)."""
    from transformers import LlamaConfig

    shape = {
        "vocab_size": VOCAB_SIZE,
        "hidden_size": 256,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 688,
        **shape,
    }
    cfg = LlamaConfig(
        **shape,
        max_position_embeddings=1024,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        rms_norm_eps=1e-5,
        hidden_act="silu",
        initializer_range=0.02,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    )
    cfg.architectures = ["LlamaForCausalLM"]
    return cfg


def load_base_fp32(base_dir: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float16)
    return model.float().eval()


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def perplexity(model, tok, text: str, block: int = SEQ_LEN, batch: int = 16) -> tuple[float, int]:
    """Token-level perplexity over non-overlapping blocks of ``block`` tokens.

    The text is encoded once with the tokenizer's special tokens (so it starts with BOS) and cut into
    consecutive blocks; a trailing partial block is kept if it has at least 2 tokens.  Every block is
    scored independently (no context carried over); the first token of each block is not predicted.
    """
    ids = torch.tensor(tok(text)["input_ids"], dtype=torch.long)
    blocks = [ids[i : i + block] for i in range(0, ids.numel(), block)]
    blocks = [b for b in blocks if b.numel() >= 2]
    nll, count = 0.0, 0
    model.eval()
    for i in range(0, len(blocks), batch):
        chunk = blocks[i : i + batch]
        full = [b for b in chunk if b.numel() == block]
        groups = ([torch.stack(full)] if full else []) + [b[None] for b in chunk if b.numel() != block]
        for x in groups:
            logits = model(input_ids=x).logits.float()
            nll += F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1), reduction="sum"
            ).item()
            count += x[:, 1:].numel()
    return math.exp(nll / count), count


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="data dir (default: lorafast_export/data)")
    ap.add_argument("--base-steps", type=int, default=500)
    ap.add_argument("--base-batch", type=int, default=16)
    ap.add_argument("--base-lr", type=float, default=3e-3)
    ap.add_argument("--adapter-steps", type=int, default=200)
    ap.add_argument("--adapter-batch", type=int, default=16)
    ap.add_argument("--adapter-lr", type=float, default=2e-3)
    ap.add_argument("--eval-every", type=int, default=100, help="held-out eval during training (0: off)")
    args = ap.parse_args(argv)

    t_start = time.time()
    torch.set_num_threads(NUM_THREADS)
    torch.manual_seed(SEED)

    import transformers
    from peft import LoraConfig, PeftModel, get_peft_model

    transformers.logging.set_verbosity_error()  # "sequence longer than model_max_length" on whole files
    transformers.logging.disable_progress_bar()
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    out: Path = args.out.resolve()
    demo = out / "demo"
    base_dir, lora_dir, dora_dir = demo / "base", demo / "lora", demo / "dora"
    for d in (base_dir, lora_dir, dora_dir):
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)

    # ---- data ------------------------------------------------------------------------------
    prose_train, prose_held = load_prose()
    code_train, code_held, digests = load_code()
    data = {
        "prose_eval": "\n".join(prose_held),
        "code_eval": "\n\n".join(t.rstrip("\n") + "\n" for t in code_held).rstrip("\n") + "\n",
        "calib": make_calib(prose_train, code_train),
        "code_digests": digests,
        "n_prose_topics": len(prose_train) + len(prose_held),
        "prose_train_chars": sum(map(len, prose_train)),
        "code_train_chars": sum(map(len, code_train)),
    }
    write_text_files(out, data)
    log(
        f"data: prose train {data['prose_train_chars']} chars / eval {len(data['prose_eval'])}; "
        f"code train {data['code_train_chars']} chars / eval {len(data['code_eval'])}; calib {len(data['calib'])}"
    )

    # ---- tokenizer ---------------------------------------------------------------------------
    train_tokenizer(prose_train + code_train, base_dir)
    check_tokenizer(base_dir, [data["code_eval"][:5000], data["prose_eval"][:5000], "\t  x = 1\r\n\n  é → ü"])
    tok = AutoTokenizer.from_pretrained(base_dir)
    prose_stream = encode_docs(tok, prose_train)
    code_stream = encode_docs(tok, code_train)
    log(f"tokens: prose train {prose_stream.numel()}, code train {code_stream.numel()}")

    texts = {"prose": data["prose_eval"], "code": data["code_eval"]}

    def quick_eval(model) -> str:
        return ", ".join(f"{k} ppl {perplexity(model, tok, v)[0]:.2f}" for k, v in texts.items())

    # ---- base --------------------------------------------------------------------------------
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(make_config())
    log(f"base: {sum(p.numel() for p in model.parameters())} params")
    t0 = time.time()
    train_loop(
        model,
        [p for p in model.parameters()],
        prose_stream,
        steps=args.base_steps,
        batch=args.base_batch,
        lr=args.base_lr,
        wd=0.1,
        seed=SEED + 1,
        tag="base",
        eval_fn=quick_eval,
        eval_every=args.eval_every,
    )
    t_base = time.time() - t0
    model.config.architectures = ["LlamaForCausalLM"]
    model.half().save_pretrained(base_dir, safe_serialization=True)
    del model
    log(f"base saved to {base_dir} ({t_base:.0f}s)")

    # ---- adapters ----------------------------------------------------------------------------
    t_adapters = {}
    for name, use_dora, adir in (("lora", False, lora_dir), ("dora", True, dora_dir)):
        torch.manual_seed(SEED + 10)
        base = load_base_fp32(base_dir)
        cfg = LoraConfig(
            task_type="CAUSAL_LM",
            r=16,
            lora_alpha=32,
            lora_dropout=0.0,
            target_modules=list(TARGET_MODULES),
            bias="none",
            use_dora=use_dora,
        )
        pm = get_peft_model(base, cfg)
        pm.peft_config["default"].base_model_name_or_path = BASE_NAME
        params = [p for p in pm.parameters() if p.requires_grad]
        log(f"{name}: {sum(p.numel() for p in params)} trainable params")
        t0 = time.time()
        train_loop(
            pm,
            params,
            code_stream,
            steps=args.adapter_steps,
            batch=args.adapter_batch,
            lr=args.adapter_lr,
            wd=0.0,
            seed=SEED + 2,
            tag=name,
            eval_fn=quick_eval,
            eval_every=args.eval_every,
        )
        t_adapters[name] = time.time() - t0
        pm.peft_config["default"].base_model_name_or_path = BASE_NAME
        pm.save_pretrained(adir, safe_serialization=True, save_embedding_layers=False)
        card = adir / "README.md"  # auto-generated PEFT model card template; not wanted in the package
        if card.exists():
            card.unlink()
        cfg_path = adir / "adapter_config.json"
        acfg = json.loads(cfg_path.read_text())
        assert acfg["base_model_name_or_path"] == BASE_NAME, acfg["base_model_name_or_path"]
        # PEFT stores target_modules as a set, so its JSON order depends on PYTHONHASHSEED: sort it so
        # that re-runs give byte-identical files (same layout as PEFT's own writer otherwise).
        acfg["target_modules"] = sorted(acfg["target_modules"])
        cfg_path.write_text(json.dumps(acfg, indent=2, sort_keys=True))
        del pm, base
        log(f"{name} saved to {adir} ({t_adapters[name]:.0f}s)")

    # ---- evaluation (reloaded from disk, fp32) -----------------------------------------------
    results: dict[str, dict[str, tuple[float, int]]] = {}
    for name in ("base", "lora", "dora"):
        m = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float16).float().eval()
        if name != "base":
            m = PeftModel.from_pretrained(m, demo / name).eval()
        results[name] = {k: perplexity(m, tok, v) for k, v in texts.items()}
        log(f"eval {name}: " + ", ".join(f"{k} {p:.3f}" for k, (p, _) in results[name].items()))
        del m

    print("\n" + format_table(results) + "\n", flush=True)

    total = time.time() - t_start
    times = {"total": total, "base": t_base, **t_adapters}
    load = os.getloadavg()
    note = (
        f"Load average at the end of the run: {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1/5/15 min) "
        f"on {os.cpu_count()} CPUs."
    )
    write_perplexity(demo, results, times, command_line(ap, args), note)
    write_readme(demo, args)
    log(f"done in {total / 60:.1f} min")


def command_line(ap: argparse.ArgumentParser, args) -> str:
    """The command, with only the options that change the outputs (not --out / --eval-every)."""
    parts = ["python scripts/train_demo.py"]
    for act in ap._actions:
        if act.dest in ("help", "out", "eval_every"):
            continue
        val = getattr(args, act.dest)
        if val != act.default:
            parts.append(f"{act.option_strings[0]} {val}")
    return " ".join(parts)


def format_table(results: dict) -> str:
    label = {"base": "base", "lora": "base + LoRA", "dora": "base + DoRA"}
    rows = [f"| {label[n]} | {results[n]['prose'][0]:.3f} | {results[n]['code'][0]:.3f} |" for n in results]
    return "| model | prose ppl | code ppl |\n|---|---|---|\n" + "\n".join(rows)


def write_perplexity(demo: Path, results: dict, times: dict, cmd: str, note: str = "") -> None:
    import peft
    import tokenizers
    import transformers

    n_prose, n_code = results["base"]["prose"][1], results["base"]["code"][1]
    (demo / "PERPLEXITY.md").write_text(
        f"""# Demo model perplexity

Produced by `{cmd}`: wall-clock {times["total"] / 60:.1f} min with {NUM_THREADS} torch threads
(base {times["base"] / 60:.1f} min, LoRA {times["lora"] / 60:.1f} min, DoRA {times["dora"] / 60:.1f} min).
{note}

Held-out text: `text/prose_eval.txt` ({n_prose} scored tokens) and `text/code_eval.txt` ({n_code} scored
tokens).  Computed in fp32 (the float16 base upcast to float32; adapters applied unmerged via
`PeftModel.from_pretrained`).  Each file is tokenized once (with BOS), cut into consecutive
non-overlapping blocks of {SEQ_LEN} tokens (a trailing partial block is kept), every block scored
independently; ppl = exp(mean token NLL).

{format_table(results)}

Environment: Python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__},
peft {peft.__version__}, tokenizers {tokenizers.__version__}.
""",
        encoding="utf-8",
    )


def write_readme(demo: Path, args) -> None:
    (demo / "README.md").write_text(
        f"""# Bundled demo model

A tiny Llama-family model and two PEFT adapters, small enough to ship in the package and to run the
whole export/validation pipeline on a laptop CPU.  Made from scratch by `python scripts/train_demo.py`
(deterministic for a given CPython / torch version; roughly 12-15 min on 2 idle CPU cores, far longer on a
busy machine); see `PERPLEXITY.md` for the held-out quality numbers and the recorded run time.

| dir | what |
|---|---|
| `base/` | `LlamaForCausalLM` (vocab {VOCAB_SIZE}, hidden 256, 4 layers, 4 heads / 2 KV heads, MLP 688, RoPE theta 1e4, untied embeddings), float16 safetensors, plus its byte-level BPE tokenizer (`<s>` BOS prepended, `</s>` EOS, `<pad>`). Trained in fp32 from random init on the *prose* train split ({args.base_steps} steps x {args.base_batch} x {SEQ_LEN} tokens, AdamW). |
| `lora/` | PEFT LoRA adapter, r=16, alpha=32, dropout 0, on q/k/v/o/gate/up/down projections; fine-tuned in fp32 on the *code* train split ({args.adapter_steps} steps x {args.adapter_batch} x {SEQ_LEN} tokens). `base_model_name_or_path` is `{BASE_NAME}` (i.e. `base/`). |
| `dora/` | Same as `lora/` with `use_dora=True`. |

Load it with (transformers 5.x loads the float16 checkpoint as float16 unless told otherwise)

```python
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from peft import PeftModel
tok = AutoTokenizer.from_pretrained("lorafast_export/data/demo/base")
model = AutoModelForCausalLM.from_pretrained("lorafast_export/data/demo/base", dtype=torch.float32)
model = PeftModel.from_pretrained(model, "lorafast_export/data/demo/lora")
```

Training / evaluation text: `../text/` (see `../text/SOURCES.md`).  All of it comes from the CPython
standard library (`pydoc_data.topics` and the source of stdlib modules), licensed under the
Python Software Foundation License Version 2.  The weights are derived solely from that text.
""",
        encoding="utf-8",
    )


if __name__ == "__main__":
    main()
