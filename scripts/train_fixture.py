#!/usr/bin/env python
"""Build the 30M quantization fixture (issue 14): a trained Llama base plus a LoRA on a second domain.

Shapes chosen to look like users' models at group 128: hidden 512, 8 layers, MLP 1376 (not a multiple of
128, so down_proj has a ragged last group of 96 columns), GQA 8 / 4 heads of 64, vocab 8192, untied
embeddings: 31.6M parameters, 63 MB in float16. Too big for git, so this script is committed and its output
lives outside the repository (by default /work/fixtures/quant30m):

* ``base/``   tokenizer (byte-level BPE, 8192) + ``LlamaForCausalLM`` (float16 safetensors, 15 MB shards)
* ``lora/``   PEFT LoRA (r=16, alpha=32, every linear), trained on the second domain
* ``text/``   ``calib.txt`` (from the training splits), ``prose_eval.txt`` / ``code_eval.txt`` (held out
  from every training step and from the tokenizer), ``SOURCES.md``
* ``TRAINING.md`` the command, the step counts, the losses and held-out perplexities

Data (scripts/train_demo.py's sources, larger): the CPython standard library of the running interpreter.
The BASE learns "general" text: the language-reference prose (pydoc_data topics, every topic with
index % 4 == 1 held out) plus the source of every top-level pure-Python stdlib module that is not one of the
demo's CODE_MODULES. The LORA learns the demo's code domain: the CODE_MODULES that are not held out.
Held-out code: train_demo's CODE_HELDOUT plus ``fractions`` and ``statistics``.

Regenerate (on the GPU machine, about 3 minutes on one H200; the CPU works too, far slower)::

    python scripts/train_fixture.py --out /work/fixtures/quant30m

The run is deterministic for a given CPython stdlib, torch build and device (float32 weights, bf16
autocast on CUDA). The fixture in /work/fixtures/quant30m was made on the H200 with Python 3.12 (see its
TRAINING.md); a different CPython gives different text and so a different model.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_demo as demo  # noqa: E402

SEED = 4321
VOCAB_SIZE = 8192
SEQ_LEN = 256
PROSE_HOLDOUT_MOD, PROSE_HOLDOUT_REM = 4, 1  # a quarter of the topics: ~23k held-out tokens
CODE_HELDOUT = sorted([*demo.CODE_HELDOUT, "fractions", "statistics"])
CALIB_CHARS, CALIB_CHUNK = 160_000, 2_000  # ~45k tokens: 64 x 256 windows fit with room to spare
# jokes and stubs are not code; pydoc_data holds the prose topics (held out in part) as a string literal
SKIP_MODULES = {"antigravity", "this", "__hello__", "__phello__", "pydoc_data"}


def make_config():
    return demo.make_config(
        vocab_size=VOCAB_SIZE,
        hidden_size=512,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=64,
        intermediate_size=1376,
    )


def load_data() -> dict:
    """The splits: base (prose train + general code), lora (the demo's code modules), calib, eval."""
    from pydoc_data.topics import topics

    prose_train, prose_held = [], []
    for i, key in enumerate(sorted(topics)):
        text = topics[key].strip("\n") + "\n"
        (prose_held if i % PROSE_HOLDOUT_MOD == PROSE_HOLDOUT_REM else prose_train).append(text)
    lib = demo.stdlib_dir()
    held = {*demo.CODE_MODULES, *CODE_HELDOUT, *SKIP_MODULES}
    general = [
        path.read_bytes().decode("utf-8", errors="replace").replace("\r\n", "\n")
        for path in sorted(lib.rglob("*.py"))
        if _general_code(path.relative_to(lib), held)
    ]
    code = {n: _module_source(n) for n in sorted({*demo.CODE_MODULES, *CODE_HELDOUT})}
    lora_train = [t for n, t in code.items() if n not in CODE_HELDOUT]
    code_held = [code[n] for n in CODE_HELDOUT]
    demo.CALIB_CHARS, demo.CALIB_CHUNK = CALIB_CHARS, CALIB_CHUNK  # make_calib reads these module globals
    return {
        "base": prose_train + general,
        "prose_train": prose_train,
        "general": general,
        "lora": lora_train,
        "calib": demo.make_calib(prose_train, lora_train),
        "prose_eval": "\n".join(prose_held),
        "code_eval": "\n\n".join(t.rstrip("\n") + "\n" for t in code_held).rstrip("\n") + "\n",
    }


def _general_code(rel: Path, held: set[str]) -> bool:
    """A stdlib file for the base's "general code": not a test, not installed packages, not of a module
    that the LoRA learns or that is held out for evaluation."""
    parts = rel.parts
    top = parts[0].removesuffix(".py")
    tests = {"test", "tests", "idle_test", "site-packages", "dist-packages"}
    return top not in held and not tests & set(parts[:-1])


def _module_source(name: str) -> str:
    """A stdlib module's source (Lib/NAME.py, or Lib/NAME/__init__.py where it became a package)."""
    path = demo.stdlib_dir() / f"{name}.py"
    path = path if path.exists() else demo.stdlib_dir() / name / "__init__.py"
    return path.read_text(encoding="utf-8").replace("\r\n", "\n")


def lr_at(step: int, total: int, peak: float) -> float:
    warmup = max(1, total // 20)
    if step < warmup:
        return peak * (step + 1) / warmup
    prog = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * prog)))


def train(model, params, stream, *, steps, batch, lr, wd, seed, device, tag) -> list[str]:
    """AdamW, cosine schedule, random windows of the token stream; bf16 autocast on CUDA. Returns log lines."""
    gen = torch.Generator().manual_seed(seed)
    fused = {"fused": True} if device.type == "cuda" else {}
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=wd, eps=1e-8, **fused)
    stream = stream.to(device)
    lines, ema, t0 = [], None, time.time()
    model.train()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr)
        starts = torch.randint(0, stream.numel() - SEQ_LEN - 1, (batch,), generator=gen).to(device)
        x = stream[starts[:, None] + torch.arange(SEQ_LEN, device=device)]  # [batch, seq]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(input_ids=x).logits
        loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 50 == 0 or step + 1 == steps:
            v = loss.item()
            ema = v if ema is None else 0.8 * ema + 0.2 * v
            lines.append(
                f"{tag} step {step + 1}/{steps} loss {v:.3f} (ema {ema:.3f}) {time.time() - t0:.0f}s"
            )
            demo.log(lines[-1])
    model.eval()
    return lines


@torch.no_grad()
def perplexity(model, tok, text: str, device) -> float:
    ids = torch.tensor(tok(text)["input_ids"])
    n = ids.numel() // SEQ_LEN
    x = ids[: n * SEQ_LEN].view(n, SEQ_LEN).to(device)
    nll = 0.0
    for b in x.split(32):
        logits = model(input_ids=b).logits.float()
        nll += F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.size(-1)), b[:, 1:].reshape(-1), reduction="sum"
        )
    return math.exp(float(nll) / (n * (SEQ_LEN - 1)))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("/work/fixtures/quant30m"))
    ap.add_argument("--base-steps", type=int, default=1200)
    ap.add_argument("--base-lr", type=float, default=1.5e-3)
    ap.add_argument("--adapter-steps", type=int, default=300)
    ap.add_argument("--adapter-lr", type=float, default=1e-3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    t_start = time.time()
    torch.manual_seed(SEED)
    import transformers
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    transformers.logging.set_verbosity_error()
    out = args.out.resolve()
    base_dir, lora_dir, text_dir = out / "base", out / "lora", out / "text"
    for d in (base_dir, lora_dir, text_dir):
        d.mkdir(parents=True, exist_ok=True)
    data = load_data()
    for name in ("calib", "prose_eval", "code_eval"):
        (text_dir / f"{name}.txt").write_text(data[name], encoding="utf-8")
    demo.VOCAB_SIZE = VOCAB_SIZE  # train_tokenizer reads the module global
    demo.train_tokenizer(data["base"], base_dir)
    tok = AutoTokenizer.from_pretrained(base_dir)
    base_stream, lora_stream = demo.encode_docs(tok, data["base"]), demo.encode_docs(tok, data["lora"])
    n_eval = {k: len(tok(data[k])["input_ids"]) for k in ("prose_eval", "code_eval", "calib")}
    demo.log(f"tokens: base {base_stream.numel()}, lora {lora_stream.numel()}, {n_eval}")

    model = LlamaForCausalLM(make_config()).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    demo.log(f"base: {n_params} params on {device}")
    log = train(
        model, list(model.parameters()), base_stream, steps=args.base_steps, batch=args.batch,
        lr=args.base_lr, wd=0.1, seed=SEED + 1, device=device, tag="base",
    )  # fmt: skip
    model.half().cpu().save_pretrained(base_dir, safe_serialization=True, max_shard_size="15MB")
    del model

    torch.manual_seed(SEED + 10)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float16).float().to(device)
    cfg = LoraConfig(
        task_type="CAUSAL_LM", r=16, lora_alpha=32, lora_dropout=0.0,
        target_modules=list(demo.TARGET_MODULES), bias="none",
    )  # fmt: skip
    pm = get_peft_model(base, cfg)
    params = [p for p in pm.parameters() if p.requires_grad]
    log += train(
        pm, params, lora_stream, steps=args.adapter_steps, batch=args.batch, lr=args.adapter_lr, wd=0.0,
        seed=SEED + 2, device=device, tag="lora",
    )  # fmt: skip
    for p in params:  # stored in float16 like the base (and half the bytes); PEFT casts it back on load
        p.data = p.data.half()
    pm.peft_config["default"].base_model_name_or_path = "lorafast-export-quant30m-base"
    pm.save_pretrained(lora_dir, safe_serialization=True)
    (lora_dir / "README.md").unlink(missing_ok=True)
    del pm, base

    ppl = {}
    for name in ("base", "lora"):
        m = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float16).float().to(device).eval()
        if name == "lora":
            m = PeftModel.from_pretrained(m, lora_dir).eval()
        ppl[name] = {k: perplexity(m, tok, data[k], device) for k in ("prose_eval", "code_eval")}
        demo.log(f"held-out perplexity {name}: {ppl[name]}")
    rows = "\n".join(f"| {n} | {p['prose_eval']:.2f} | {p['code_eval']:.2f} |" for n, p in ppl.items())
    (out / "TRAINING.md").write_text(
        f"# quant30m fixture\n\n`python scripts/train_fixture.py {' '.join(argv or sys.argv[1:])}` on {device} "
        f"({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}), Python "
        f"{sys.version.split()[0]}, torch {torch.__version__}, transformers {transformers.__version__}; "
        f"{time.time() - t_start:.0f} s.\n\n{n_params} parameters. Tokens: base stream {base_stream.numel()}, "
        f"lora stream {lora_stream.numel()}, held-out prose {n_eval['prose_eval']}, held-out code "
        f"{n_eval['code_eval']}, calib {n_eval['calib']}.\n\n| model | prose_eval ppl | code_eval ppl |\n"
        f"|---|---|---|\n{rows}\n\n```\n" + "\n".join(log) + "\n```\n",
        encoding="utf-8",
    )
    demo.log(f"done in {time.time() - t_start:.0f}s: {out}")


if __name__ == "__main__":
    main()
