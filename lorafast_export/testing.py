"""Helpers that tests and bench scripts share (neither imports the other): tiny transformers models and tokenizers
built on the fly (no hub access; the ground truth is transformers + PEFT), paged KV pools with the Triton
decode kernel's cases, and the streaming merge's memory measurement. Nothing in the package imports this module.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import peft
import torch
import transformers
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors

# ---------------------------------------------------------------------------------------------- tiny models

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
    rnd = random.Random(seed)
    words = ["the", "model", "adapter", "merge", "def", "return", "value", "(x)", "layer", "token", "=", ":"]
    text = " ".join(rnd.choice(words) for _ in range(n_chars // 4))
    path.write_text(text[:n_chars])
    return path


# ------------------------------------------------------------------------------------- paged attention pools


def scattered_pool(lengths, hkv=2, d=8, bs=4, seed=0):
    """Random keys/values of each sequence written to shuffled physical blocks; dense copies for reference."""
    g = torch.Generator().manual_seed(seed)
    n_blocks = sum(-(-n // bs) for n in lengths) + 3
    k_pool, v_pool = torch.randn(2, hkv, (n_blocks + 1) * bs, d, generator=g).unbind(0)
    free = (torch.randperm(n_blocks, generator=g) + 1).tolist()
    width = max(-(-n // bs) for n in lengths) + 1
    tables, dense = torch.zeros(len(lengths), width, dtype=torch.int32), []
    for i, n in enumerate(lengths):
        blocks = [free.pop() for _ in range(-(-n // bs))]
        tables[i, : len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        idx = torch.tensor([blocks[t // bs] * bs + t % bs for t in range(n)])
        dense.append((k_pool[:, idx], v_pool[:, idx]))
    return k_pool, v_pool, tables, torch.tensor(lengths), dense


# lengths, kv heads, q heads, head dim, window: the Triton paged decode kernel's cases (its test and torch_bench)
TRITON_DECODE_CASES = [
    ([1, 4, 17, 40], 2, 8, 16, None),  # GQA 4; 40 tokens = 3 blocks, several context splits
    ([3, 33, 70], 2, 4, 64, 20),  # sliding window
    ([200], 1, 1, 32, None),  # one row: many splits, most blocks of a split past the end
]


# --------------------------------------------------------------------------------------- merge peak memory

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
t = threading.Thread(target=poll, daemon=True); t.start()
try:  # a merge that raises (a full disk) exits non-zero; the poller never holds the interpreter open
    merge(m, [a], Path(out), max_shard_bytes=shard)
finally:
    stop = True; t.join()
peak[0] = max(peak[0], anon_kb())
print(json.dumps({"peak_delta_mb": (peak[0] - start) / 1024}))
"""


def make_checkpoint(root: Path, layers: int, hidden: int, inter: int) -> tuple[Path, Path, int, int]:
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
            timeout=600,  # a hung child fails the caller instead of holding it
        )
        if res.returncode:
            raise RuntimeError(f"the merge child exited {res.returncode}:\n{res.stderr[-3000:]}")
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
