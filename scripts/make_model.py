"""Random Llama / Qwen2 / Mistral-shaped bases at any size, sharded like the Hub's, plus PEFT LoRA/DoRA adapters.

    python scripts/make_model.py base OUT --preset llama3-8b [--family llama] [--dtype bfloat16] [--device cuda]
    python scripts/make_model.py adapter OUT --base BASE [--r 16] [--alpha 32] [--dora] [--targets q_proj,v_proj]
    python scripts/make_model.py both OUT --preset 30m            # OUT/base + OUT/lora
    python scripts/make_model.py widen OUT --base DEMO/base --adapter DEMO/lora --preset llama3-8b  # trained, 8B-wide

Importable: `make_base(out, shape, ...)`, `make_adapter(out, base_dir, ...)`, `widen(...)`, `make_widened(...)`,
`PRESETS`.

`widen` lays a trained Llama checkpoint (the demo) into a larger shape that computes the same function up to
rounding (its docstring says how), and `widen_lora` its LoRA: speculative acceptance and accuracy gates that mean
something, at the bytes per step of a real shape.

- Weights are N(0, std) (norms 1), drawn per tensor from a seed derived from the tensor's name, so the
  shard size does not change them. On a CPU, tensors over 16M elements are cut from one pool of normal values
  (drawing 13B values would take many minutes); on CUDA every tensor is drawn. On CUDA they are drawn on the GPU and written shard by shard: only one
  shard is ever held on the host (a 16 GB 8B shape takes about 30 s on an H200).
- Shards are `model-0000k-of-0000n.safetensors` + `model.safetensors.index.json` (embeddings first, lm_head
  last), or one `model.safetensors` when the model fits in one shard, as `save_pretrained` writes them.
- Tokenizer: the bundled demo tokenizer (2,048 ids, byte-level BPE trained on Python prose) when the vocab
  holds it, else a character-level one. No 32k or 128k tokenizer is available offline, so text only ever
  reaches the first 2,048 embedding rows; the lm_head still spans the whole vocabulary, which is what sizes
  logits, the reference cache and the KL cost.
- Adapters are written as `peft`'s `save_pretrained` writes them (adapter_config.json from `LoraConfig`,
  adapter_model.safetensors keyed `base_model.model.<module>.lora_A.weight`), with a random non-zero B so
  the merge is not a no-op. DoRA magnitudes are the true column norms of W + s*B@A, perturbed by 5%.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
import zlib
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
DEMO_BASE = REPO / "lorafast_export" / "data" / "demo" / "base"
DEMO_VOCAB = 2048

# name -> (hidden, intermediate, layers, heads, kv_heads, vocab, extra config)
PRESETS: dict[str, dict] = {
    "llama3-8b": dict(
        hidden=4096,
        inter=14336,
        layers=32,
        heads=32,
        kv_heads=8,
        vocab=128256,
        max_pos=8192,
        rope={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    ),  # fmt: skip
    "tinyllama-1.1b": dict(
        hidden=2048, inter=5632, layers=22, heads=32, kv_heads=4, vocab=32000, max_pos=2048
    ),
    "llama-13b": dict(hidden=5120, inter=13824, layers=40, heads=40, kv_heads=40, vocab=32000, max_pos=4096),
    "demo-like": dict(hidden=256, inter=688, layers=4, heads=4, kv_heads=2, vocab=2048, max_pos=1024),
    "30m": dict(hidden=512, inter=1408, layers=10, heads=8, kv_heads=4, vocab=2048, max_pos=1024),
}
FAMILIES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def shape_of(preset: str | None = None, **overrides) -> dict:
    """A preset's shape with any field overridden (None = keep); a free shape needs every field."""
    shape = dict(PRESETS[preset]) if preset else {}
    shape.update({k: v for k, v in overrides.items() if v is not None})
    shape.setdefault("max_pos", 4096)
    missing = [k for k in ("hidden", "inter", "layers", "heads", "kv_heads", "vocab") if k not in shape]
    if missing:
        raise ValueError(f"shape needs {missing} (or a --preset: {', '.join(PRESETS)})")
    return shape


def hf_config(shape: dict, family: str = "llama", dtype: str = "bfloat16", tie: bool = False) -> dict:
    """config.json for the shape, in transformers 5's form (rope_parameters)."""
    if family not in FAMILIES:
        raise ValueError(f"family {family!r}: choose one of {', '.join(FAMILIES)}")
    rope = shape.get("rope") or {"rope_type": "default", "rope_theta": 10000.0}
    cfg = {
        "architectures": [FAMILIES[family]],
        "model_type": family,
        "hidden_size": shape["hidden"],
        "intermediate_size": shape["inter"],
        "num_hidden_layers": shape["layers"],
        "num_attention_heads": shape["heads"],
        "num_key_value_heads": shape["kv_heads"],
        "head_dim": shape["hidden"] // shape["heads"],
        "vocab_size": shape["vocab"],
        "max_position_embeddings": shape["max_pos"],
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_parameters": rope,
        "tie_word_embeddings": tie,
        "dtype": dtype,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "pad_token_id": 2,
        "use_cache": True,
    }
    if family == "mistral":
        cfg["sliding_window"] = shape.get("sliding_window", 4096)
    if family == "qwen2":
        cfg["use_sliding_window"] = False
    return cfg


def llama_kwargs(shape: dict) -> dict:
    """transformers.LlamaConfig keyword arguments for a shape (to build the model in memory instead)."""
    cfg = hf_config(shape)
    keep = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "max_position_embeddings", "rope_parameters")  # fmt: skip
    return {k: cfg[k] for k in keep}


def tensor_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Every base tensor's name and shape, in the Hub's order (embeddings, layers, norm, lm_head)."""
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    out = {"model.embed_tokens.weight": (v, h)}
    lin = {"self_attn.q_proj": (q, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
           "self_attn.o_proj": (h, q), "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h), "mlp.down_proj": (h, i)}  # fmt: skip
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        out[p + "input_layernorm.weight"] = (h,)
        out[p + "post_attention_layernorm.weight"] = (h,)
        for mod, s in lin.items():
            out[p + mod + ".weight"] = s
            if cfg["model_type"] == "qwen2" and mod[-6:] in ("q_proj", "k_proj", "v_proj"):
                out[p + mod + ".bias"] = (s[0],)
    out["model.norm.weight"] = (h,)
    if not cfg["tie_word_embeddings"]:
        out["lm_head.weight"] = (v, h)
    return out


def _generator(device: str, seed: int, name: str) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


# On a CPU, drawing 13B normal values takes minutes of a busy core; tensors over POOL_MIN elements are instead
# cut from one shared pool of N(0, 1) values at a per-tensor offset (the pool's odd length keeps rows of any width
# from repeating). Fine for speed and memory work; use a GPU (or small models) for i.i.d. weights.
POOL_MIN = 1 << 24
_POOL: dict[int, torch.Tensor] = {}


def _pooled(numel: int, seed: int, name: str) -> torch.Tensor:
    if seed not in _POOL:
        _POOL[seed] = torch.randn((1 << 25) + 1, generator=_generator("cpu", seed, "pool"))
    pool = _POOL[seed]
    start = zlib.crc32(name.encode()) % pool.numel()
    reps = -(-(start + numel) // pool.numel())
    return pool.repeat(reps)[start : start + numel] if reps > 1 else pool[start : start + numel].clone()


def _random_tensor(name: str, shape, seed: int, std: float, dtype, device: str) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=dtype)
    n = _numel(shape)
    if device == "cpu" and n > POOL_MIN:
        x = _pooled(n, seed, name).view(shape)
    else:
        x = torch.randn(shape, generator=_generator(device, seed, name), device=device, dtype=torch.float32)
    scale = std if name.endswith(".weight") else std * 0.5  # qkv biases
    return x.mul_(scale).to(dtype).cpu()


def _shard_plan(shapes: dict, itemsize: int, shard_bytes: int) -> list[list[str]]:
    """Names grouped in order into shards of at most shard_bytes (a tensor larger than that gets its own)."""
    shards, cur, size = [], [], 0
    for name, s in shapes.items():
        nbytes = itemsize * _numel(s)
        if cur and size + nbytes > shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(name)
        size += nbytes
    return shards + [cur]


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def make_base(
    out: Path,
    shape: dict,
    *,
    family: str = "llama",
    dtype: str = "bfloat16",
    tie: bool = False,
    seed: int = 0,
    std: float = 0.02,
    shard_gb: float = 5.0,
    device: str | None = None,
    log=None,
) -> dict:
    """Write a random base checkpoint + tokenizer to `out`; returns {params, bytes, shards, seconds}."""
    t0 = time.perf_counter()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = hf_config(shape, family, dtype, tie)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 1}) + "\n")
    shapes = tensor_shapes(cfg)
    tdt = DTYPES[dtype]
    itemsize = torch.empty((), dtype=tdt).element_size()
    total, n_shards = _write_shards(
        out,
        shapes,
        lambda n: _random_tensor(n, shapes[n], seed, std, tdt, device),
        itemsize,
        shard_gb,
        t0,
        log,
    )
    write_tokenizer(out, cfg["vocab_size"])
    params = sum(_numel(s) for s in shapes.values())
    return {"params": params, "bytes": total, "shards": n_shards, "seconds": time.perf_counter() - t0}


def _write_shards(out: Path, shapes: dict, tensor, itemsize: int, shard_gb: float, t0: float, log=None):
    """Every tensor of `shapes`, made by tensor(name), in Hub-like shards (an index when several) -> (bytes,
    shards). Only one shard's tensors are held at a time."""
    from safetensors.torch import save_file

    plan = _shard_plan(shapes, itemsize, int(shard_gb * 1e9))
    weight_map, total = {}, 0
    for k, names in enumerate(plan):
        fname = "model.safetensors" if len(plan) == 1 else f"model-{k + 1:05d}-of-{len(plan):05d}.safetensors"
        tensors = {n: tensor(n).contiguous().cpu() for n in names}
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, fname))
        total += sum(t.numel() * itemsize for t in tensors.values())
        del tensors
        if log:
            log(f"  {fname}: {len(names)} tensors, {time.perf_counter() - t0:.1f} s")
    if len(plan) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return total, len(plan)


def make_widened(out: Path, small: Path, shape: dict, *, adapter: Path | None = None, dtype: str = "bfloat16",
                 shard_gb: float = 5.0, device: str | None = None, log=None) -> dict:  # fmt: skip
    """widen() the checkpoint in `small` (and widen_lora() its LoRA `adapter`) and write out/base (+ out/lora)
    as the Hub and PEFT write them: a trained model at a real shape for the benchmarks."""
    from safetensors.torch import load_file, save_file

    from lorafast_export.weights import open_model

    t0 = time.perf_counter()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    ad_cfg = None
    if adapter is not None:  # checked before anything is written
        ad_cfg = json.loads((adapter / "adapter_config.json").read_text())
        if (
            ad_cfg.get("use_dora")
            or ad_cfg.get("peft_type", "LORA") != "LORA"
            or ad_cfg.get("modules_to_save")
        ):
            raise ValueError(f"{adapter}: only a plain LoRA is widened (no DoRA, no modules_to_save)")
    config = json.loads((small / "config.json").read_text())
    store = open_model(small).store
    state = {n: store.get(n) for n in store.keys()}
    cfg, wide = widen(config, state, shape, DTYPES[dtype], device)
    base = Path(out) / "base"
    base.mkdir(parents=True, exist_ok=True)
    (base / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (base / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 1}) + "\n")
    itemsize = torch.empty((), dtype=DTYPES[dtype]).element_size()
    total, n_shards = _write_shards(base, tensor_shapes(cfg), wide.pop, itemsize, shard_gb, t0, log)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        if (small / f).exists():
            shutil.copy(small / f, base / f)
    info = {"bytes": total, "shards": n_shards}
    if adapter is not None:
        lora = Path(out) / "lora"
        lora.mkdir(parents=True, exist_ok=True)
        tensors = widen_lora(config, load_file(str(adapter / "adapter_model.safetensors")), shape)
        save_file(tensors, str(lora / "adapter_model.safetensors"), metadata={"format": "pt"})
        ad_cfg["base_model_name_or_path"] = str(base)
        (lora / "adapter_config.json").write_text(json.dumps(ad_cfg, indent=2) + "\n")
        info["adapter_tensors"] = len(tensors)
    info["seconds"] = time.perf_counter() - t0
    return info


def write_tokenizer(out: Path, vocab: int) -> None:
    """The demo tokenizer when the model's vocab holds its 2,048 ids, else a char-level one of <= vocab ids."""
    if vocab >= DEMO_VOCAB:
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(DEMO_BASE / f, out / f)
        return
    if vocab < 8:
        raise ValueError(f"vocab {vocab}: need at least 8 ids for a tokenizer")
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    special = ["<s>", "</s>", "<pad>", "<unk>"]  # ids 0..3 match the config's bos/eos/pad
    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    tokens = special + chars[: vocab - len(special)]
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        model_input_names=["input_ids", "attention_mask"],
    )  # fmt: skip
    fast.save_pretrained(out)


def _base_reader(base_dir: Path):
    """name -> (file, shape) for every tensor of a (sharded or single-file) safetensors base."""
    from safetensors import safe_open

    index = base_dir / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values()))
        if index.exists()
        else ["model.safetensors"]
    )
    where = {}
    for f in files:
        with safe_open(str(base_dir / f), "pt") as h:
            for name in h.keys():
                where[name] = (base_dir / f, tuple(h.get_slice(name).get_shape()))
    return where


def make_adapter(
    out: Path,
    base_dir: Path,
    *,
    r: int = 16,
    alpha: int = 32,
    targets: tuple[str, ...] = LINEARS,
    dora: bool = False,
    rslora: bool = False,
    seed: int = 1,
    rel: float = 0.1,
    device: str | None = None,
) -> dict:
    """A PEFT LoRA (or DoRA) on every `targets` linear of base_dir's decoder layers, saved like peft does.

    A ~ N(0, 1/in) and B is scaled so that s*B@A has about `rel` times the base weights' spread: big enough
    that a wrong merge shows, small enough that the model stays the base's neighbour."""
    import peft
    from safetensors import safe_open
    from safetensors.torch import save_file

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    out, base_dir = Path(out), Path(base_dir)
    where = _base_reader(base_dir)
    scale = alpha / (r**0.5 if rslora else r)
    state = {}
    mods = [n[: -len(".weight")] for n in where if n.endswith(".weight") and n.split(".")[-2] in targets]
    if not mods:
        raise ValueError(f"no linear named {targets} in {base_dir}")
    for mod in mods:
        f, (o, i) = where[mod + ".weight"]
        g = _generator(device, seed, mod)
        a = torch.randn(r, i, generator=g, device=device) / i**0.5
        with safe_open(str(f), "pt", device="cpu") as h:  # DoRA needs all of W; LoRA only its spread
            w = h.get_tensor(mod + ".weight") if dora else h.get_slice(mod + ".weight")[:64]
        w = w.to(device, torch.float32)
        w_std = float(w.std())
        b = torch.randn(o, r, generator=g, device=device) * (rel * w_std * i**0.5 / (scale * r**0.5))
        key = f"base_model.model.{mod}"
        state[key + ".lora_A.weight"], state[key + ".lora_B.weight"] = a.cpu(), b.cpu()
        if dora:  # PEFT's magnitude is ||W + s*B@A|| per output row; perturbed so DoRA is not a plain LoRA
            norm = (w + scale * (b @ a)).norm(p=2, dim=1)
            state[key + ".lora_magnitude_vector"] = (norm * (1 + 0.05 * torch.randn_like(norm))).cpu()
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = peft.LoraConfig(
        r=r, lora_alpha=alpha, target_modules=sorted(targets), use_dora=dora, use_rslora=rslora,
        lora_dropout=0.0, bias="none", task_type="CAUSAL_LM", inference_mode=True,
        base_model_name_or_path=str(base_dir),
    )  # fmt: skip
    cfg.save_pretrained(str(out))
    return {"modules": len(mods), "tensors": len(state)}


def widen(config: dict, state: dict[str, torch.Tensor], shape: dict, dtype=None, device=None):
    """A trained Llama checkpoint (config.json's dict, its state dict) laid into a larger shape that computes the
    same function, up to rounding: (config, state) of a model with `shape`'s widths and layer count.

    Why: random weights make a speculative draft useless and the default gates fail, so speed measured at a real
    shape says nothing about acceptance or accuracy; the small trained model (the demo) scaled up to an 8B shape
    keeps its predictions while every kernel streams the 8B's bytes. How:
    - the hidden state lives in the first `hidden` dimensions; every other one stays 0 through every layer (the
      rows and columns outside the small model's are 0);
    - RMSNorm averages over the wide hidden size: its weights are scaled by sqrt(h / H) and eps by h / H (exact
      for the demo's 256 in 4,096: 1/4 and 1/16);
    - a small query head s (of kv head t = s // G) is the wide head t * G' + s % G', so it keeps its kv head; its
      head dimensions i < d/2 and d/2 + i go to i and D/2 + i, so rope pairs stay pairs, and rope_theta is
      theta ** (D / d), which gives those pairs the small model's frequencies; q is scaled by sqrt(D / d) for the
      wide 1/sqrt(D) (the one inexact step: rounded once to the weights' dtype); the other query heads read
      their kv head's values, and o_proj ignores them (zero columns);
    - layers past the small model's have zero weights: each adds 0 to the residual stream;
    - the lm_head's rows past the small vocabulary copy row 0: their logit ties token 0's, and argmax takes the
      first index, so greedy decoding never picks them (their embeddings are 0; no text reaches them).
    Llama-style only (no biases, untied head, default rope)."""
    device = device or "cpu"
    h, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    d = config.get("head_dim") or h // heads
    v = config["vocab_size"]
    rope = config.get("rope_parameters") or {
        "rope_type": "default",
        "rope_theta": config.get("rope_theta", 1e4),
    }
    big = dict(shape)
    big_d = big["hidden"] // big["heads"]
    g, big_g = heads // kv, big["heads"] // big["kv_heads"]
    problems = [
        f"{k} {a} > {b}"
        for k, a, b in (
            ("hidden", h, big["hidden"]),
            ("intermediate", inter, big["inter"]),
            ("layers", layers, big["layers"]),
            ("kv heads", kv, big["kv_heads"]),
            ("query heads per kv head", g, big_g),
            ("head_dim", d, big_d),
            ("vocab", v, big["vocab"]),
        )
        if a > b
    ]
    if (
        config.get("model_type") != "llama"
        or config.get("tie_word_embeddings")
        or any(k.endswith(".bias") for k in state)
    ):
        problems.append("only untied Llama checkpoints without biases are widened")
    if rope.get("rope_type", "default") != "default" or d % 2 or big_d % d:
        problems.append("needs default rope, an even head_dim and a wide head_dim that is a multiple of it")
    if problems:
        raise ValueError("widen: " + "; ".join(problems))
    dtype = dtype or next(iter(state.values())).dtype
    cfg = hf_config({**big, "rope": {"rope_type": "default", "rope_theta": float(rope["rope_theta"]) ** (big_d / d)}},
                    "llama", str(dtype).removeprefix("torch."))  # fmt: skip
    cfg["rms_norm_eps"] = config.get("rms_norm_eps", 1e-5) * h / big["hidden"]
    maps = _linear_maps(config, big, device)
    norm_scale = (h / big["hidden"]) ** 0.5
    shapes = tensor_shapes(cfg)
    out = {}
    for n in range(big["layers"]):
        p = f"model.layers.{n}."
        for k in ("input_layernorm.weight", "post_attention_layernorm.weight"):
            out[p + k] = torch.ones(shapes[p + k], device=device)
            if n < layers:
                out[p + k][:h] = state[p + k].to(device, torch.float32) * norm_scale
        for k in LINEARS:
            mod = p + _module(k) + ".weight"
            out[mod] = torch.zeros(shapes[mod], dtype=torch.float32, device=device)
            if n < layers:
                rows, cols, scale = maps[k]
                out[mod][rows[:, None], cols[None, :]] = state[mod].to(device, torch.float32) * scale
        for k in out:
            if k.startswith(p):
                out[k] = out[k].to(dtype)  # one layer in float32 at a time
    out["model.embed_tokens.weight"] = torch.zeros(shapes["model.embed_tokens.weight"], device=device)
    out["model.embed_tokens.weight"][:v, :h] = state["model.embed_tokens.weight"].to(device, torch.float32)
    out["model.norm.weight"] = torch.ones(big["hidden"], device=device)
    out["model.norm.weight"][:h] = state["model.norm.weight"].to(device, torch.float32) * norm_scale
    head = torch.zeros(shapes["lm_head.weight"], device=device)
    head[:v, :h] = state["lm_head.weight"].to(device, torch.float32)
    head[v:, :h] = head[0, :h]
    out["lm_head.weight"] = head
    return cfg, {k: out[k].to(dtype) for k in shapes}  # the Hub's order


def _module(linear: str) -> str:
    return ("self_attn." if linear[0] in "qkvo" else "mlp.") + linear


def _linear_maps(config: dict, shape: dict, device="cpu") -> dict[str, tuple]:
    """widen's placement of each linear of the model `config` in `shape`: (wide rows of its small rows, wide columns
    of its small columns, scale), the index tensors on `device`."""
    h, inter = config["hidden_size"], config["intermediate_size"]
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    d = config.get("head_dim") or h // heads
    big_d, g, big_g = shape["hidden"] // shape["heads"], heads // kv, shape["heads"] // shape["kv_heads"]
    half = torch.arange(d, device=device)
    dims = torch.where(half < d // 2, half, big_d // 2 + half - d // 2)  # small head dim -> wide head dim
    q_rows = torch.cat([(s // g * big_g + s % g) * big_d + dims for s in range(heads)])
    kv_rows = torch.cat([t * big_d + dims for t in range(kv)])
    hid, mid = torch.arange(h, device=device), torch.arange(inter, device=device)
    return {"q_proj": (q_rows, hid, (big_d / d) ** 0.5), "k_proj": (kv_rows, hid, 1.0), "v_proj": (kv_rows, hid, 1.0),
            "o_proj": (hid, q_rows, 1.0), "gate_proj": (mid, hid, 1.0), "up_proj": (mid, hid, 1.0),
            "down_proj": (hid, mid, 1.0)}  # fmt: skip


def widen_lora(config: dict, adapter: dict[str, torch.Tensor], shape: dict) -> dict[str, torch.Tensor]:
    """A PEFT LoRA of the small model (adapter_model.safetensors' tensors) for widen's model: A's columns and B's
    rows go where widen puts the module's (B of q_proj scaled as q is), so the wide delta s B A is the small one
    in place; the wide model's other layers get zero A and B. Plain LoRA on the decoder linears only."""
    maps = _linear_maps(config, shape)
    wide = tensor_shapes(hf_config(shape))
    pre, out = "base_model.model.", {}
    for name, t in adapter.items():
        mod, _, kind = name.removeprefix(pre).rpartition(".lora_")
        linear = mod.rsplit(".", 1)[-1]
        if not name.startswith(pre) or linear not in maps or kind not in ("A.weight", "B.weight"):
            raise ValueError(f"widen_lora: {name}: only lora_A / lora_B of the decoder linears are widened")
        rows, cols, scale = maps[linear]
        big_out, big_in = wide[mod + ".weight"]
        if kind == "A.weight":  # [r, in]
            w = torch.zeros(t.shape[0], big_in, dtype=torch.float32)
            w[:, cols] = t.float()
        else:  # [out, r]
            w = torch.zeros(big_out, t.shape[1], dtype=torch.float32)
            w[rows] = t.float() * scale
        out[name] = w.to(t.dtype)
    rank = max(t.shape[0] for n, t in adapter.items() if n.endswith("lora_A.weight"))
    linears = {k.rsplit(".lora_", 1)[0].rsplit(".", 1)[-1] for k in adapter}
    dt = next(iter(adapter.values())).dtype
    for n in range(config["num_hidden_layers"], shape["layers"]):  # the wide model's extra layers: no delta
        for linear in linears:
            mod = f"model.layers.{n}.{_module(linear)}"
            big_out, big_in = wide[f"{mod}.weight"]
            out[f"{pre}{mod}.lora_A.weight"] = torch.zeros(rank, big_in, dtype=dt)
            out[f"{pre}{mod}.lora_B.weight"] = torch.zeros(big_out, rank, dtype=dt)
    return out


def _parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=["base", "adapter", "both", "widen"])
    ap.add_argument("out", type=Path)
    ap.add_argument("--preset", choices=list(PRESETS))
    for f in ("hidden", "inter", "layers", "heads", "kv_heads", "vocab", "max_pos"):
        ap.add_argument("--" + f.replace("_", "-"), type=int, dest=f)
    ap.add_argument("--family", default="llama", choices=list(FAMILIES))
    ap.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    ap.add_argument("--tie", action="store_true", help="tie lm_head to the embeddings")
    ap.add_argument("--shard-gb", type=float, default=5.0)
    ap.add_argument("--std", type=float, default=0.02)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    ap.add_argument(
        "--base", type=Path, help="adapter: the base it is made for; widen: the trained base to widen"
    )
    ap.add_argument("--adapter", type=Path, help="widen: the base's LoRA, widened beside it (OUT/lora)")
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--alpha", type=int, default=32)
    ap.add_argument("--targets", default=",".join(LINEARS))
    ap.add_argument("--dora", action="store_true")
    ap.add_argument("--rslora", action="store_true")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    a = _parse(argv)
    try:
        return _run(a)
    except ValueError as e:
        print(f"make_model.py: {e}", file=sys.stderr)
        return 2


def _run(a: argparse.Namespace) -> int:
    if a.what == "widen":
        if a.base is None:
            print("make_model.py widen: --base DIR (the trained model) is required", file=sys.stderr)
            return 2
        shape = shape_of(a.preset, **{k: getattr(a, k) for k in ("hidden", "inter", "layers", "heads", "kv_heads", "vocab", "max_pos")})  # fmt: skip
        info = make_widened(a.out, a.base, shape, adapter=a.adapter, dtype=a.dtype, shard_gb=a.shard_gb,
                            device=a.device, log=print)  # fmt: skip
        print(f"widened {a.base} into {a.out}/base: {info['bytes'] / 1e9:.2f} GB in {info['shards']} file(s)"
              + (f", LoRA {a.out}/lora" if a.adapter else "") + f", {info['seconds']:.1f} s")  # fmt: skip
        return 0
    base = a.base if a.what == "adapter" else (a.out / "base" if a.what == "both" else a.out)
    if a.what in ("base", "both"):
        shape = shape_of(a.preset, **{k: getattr(a, k) for k in ("hidden", "inter", "layers", "heads", "kv_heads", "vocab", "max_pos")})  # fmt: skip
        info = make_base(base, shape, family=a.family, dtype=a.dtype, tie=a.tie, seed=a.seed, std=a.std,
                         shard_gb=a.shard_gb, device=a.device, log=print)  # fmt: skip
        print(f"base {base}: {info['params'] / 1e6:.1f}M params, {info['bytes'] / 1e9:.2f} GB "
              f"in {info['shards']} file(s), {info['seconds']:.1f} s")  # fmt: skip
    if a.what in ("adapter", "both"):
        if base is None:
            print("make_model.py adapter: --base DIR is required", file=sys.stderr)
            return 2
        ad = a.out / ("dora" if a.dora else "lora") if a.what == "both" else a.out
        info = make_adapter(ad, base, r=a.r, alpha=a.alpha, targets=tuple(a.targets.split(",")), dora=a.dora,
                            rslora=a.rslora, seed=a.seed + 1, device=a.device)  # fmt: skip
        print(f"adapter {ad}: {'DoRA' if a.dora else 'LoRA'} r{a.r} on {info['modules']} modules")
    return 0


if __name__ == "__main__":
    sys.exit(main())
