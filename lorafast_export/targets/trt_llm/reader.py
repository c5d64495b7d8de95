"""Reference reader: a trt-llm bundle (ours or ModelOpt's) → fp weights under HF names, by the documented layout.

It implements what TensorRT-LLM computes from these files, not what we meant to write:
- W8A16: w[o, c] = int8[o, c] · weight_scale[o]  (PyTorch backend WeightOnlyQuantLinearMethod →
  weight_only_quant_gemm; engine WeightOnlyQuantMatmul plugin, per_channel_scale).
- W4A16_AWQ: w[o, c] = int4[o, c] · weight_scale[o, c // group] · pre_quant_scale[c]  (W4A16_AWQ_LinearMethod:
  `input * pre_quant_scale`, finegrained_mixed_dtype_gemm(scales=weight_scale.T, has_zero_point=False,
  zeros=None)); int4 nibbles as ModelOpt's pack_int4_in_uint8 packs them (two output rows per byte, low first).
- W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN (engine checkpoints only): w[o, c] = int8[o, c] · per_channel_scale[o]
  (float32: SmoothQuantLinear's parameter is float32 and the int8 GEMM's epilogue scales the int32 accumulator by
  per-token scale × per-channel scale in float32, so nothing is cast). Activations: each linear's input is
  quantized per token at run time (`quantize_tokens`: quantization.cuh perTokenQuantization and rmsnormKernels.cu
  generalRmsNorm), after dividing the row-parallel dense / proj inputs by their `smoother` (layers.py
  SmoothQuantAttention / SmoothQuantGatedMLP). `reference_decoder` builds the canonical decoder that does this.
- runtime=True also applies the casts TensorRT-LLM makes when loading: scales (float32 in the file) and
  pre_quant_scale become the model dtype (copy_weight into half-precision parameters; the engine path's
  preprocess casts weights_scaling_factor to config.dtype), and the dequantized product is formed in that dtype.
  runtime=False multiplies in float32: the exact values stored, for checking the writer against the QTensors.
Engine checkpoints are reassembled from every rank file (columns, rows, fused qkv, vocabulary padding).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from lorafast_export.errors import InputError, UnsupportedError
from lorafast_export.model.decoder import Decoder, build_decoder
from lorafast_export.model.spec import EMBED, FINAL_NORM, LM_HEAD, ModelConfig, layer_prefix
from lorafast_export.targets.trt_llm.hf_bundle import META_FILE, META_FORMAT
from lorafast_export.targets.trt_llm.legacy import COLUMN, ROW
from lorafast_export.targets.trt_llm.pack import dequant_int4_groups, dequant_int8_rows, unpack_int4_rows
from lorafast_export.targets.trt_llm.scheme import DTYPES, W4A16_AWQ, W8A8_SQ, W8A16

SUPPORTED = (None, W8A16, W4A16_AWQ)  # the PyTorch-backend (HF) layout
SUPPORTED_LEGACY = (*SUPPORTED, W8A8_SQ)  # the engine checkpoint
SCALE_KEYS = {W8A8_SQ: "per_channel_scale"}  # legacy: else weights_scaling_factor


def read_meta(model_dir: Path) -> dict:
    path = Path(model_dir) / META_FILE
    if not path.is_file():
        raise InputError(
            f"{model_dir}: no {META_FILE}; this is not a trt-llm bundle written by lorafast-export "
            "(lower it with --target trt-llm)."
        )
    meta = json.loads(path.read_text())
    if meta.get("format") != META_FORMAT:
        raise InputError(f"{path}: format {meta.get('format')!r} is not {META_FORMAT!r}.")
    return meta


def read_bundle(model_dir: Path, runtime: bool = True) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Our bundle (either layout, as its lorafast_trtllm.json says) → (ModelConfig, float32 state dict)."""
    meta = read_meta(model_dir)
    if meta["layout"] == "hf":
        return read_hf(model_dir, runtime)
    return read_legacy(model_dir, meta["hf_config"], runtime)


def _quant_of(quant: dict, source: Path, supported: tuple = SUPPORTED) -> tuple[str | None, int | None]:
    algo = quant.get("quant_algo")
    if algo not in supported:
        raise UnsupportedError(f"{source}: quant_algo {algo!r} is not read here (supported: {supported}).")
    return algo, quant.get("group_size")


def dequant(
    algo: str | None,
    t: dict[str, torch.Tensor],
    group: int | None,
    dtype: torch.dtype | None,
    scale_key: str,
    pqs_key: str,
) -> torch.Tensor:
    """One linear's tensors → float32 [out, in]. dtype: the runtime's (casts applied) or None (exact, float32)."""
    weight = t["weight"]
    if algo is None:
        return weight.float()
    if algo == W8A8_SQ:  # float32 scales in the kernel too: runtime and exact readings are the same
        return dequant_int8_rows(weight, t[scale_key].reshape(-1))
    scale = t[scale_key] if dtype is None else t[scale_key].to(dtype)
    if algo == W8A16:
        w = weight.to(scale.dtype) * scale[:, None] if dtype is not None else dequant_int8_rows(weight, scale)
        return w.float()
    w4 = unpack_int4_rows(weight)
    if dtype is not None:
        g = torch.arange(w4.shape[1]) // group
        w = (w4.to(dtype) * scale[:, g]).float()
    else:
        w = dequant_int4_groups(w4, scale, group)
    if pqs_key in t:
        pqs = t[pqs_key] if dtype is None else t[pqs_key].to(dtype)
        w = w * pqs.float()[None, :]
    return w


# ------------------------------------------------------------------------------------------------ HF


def _load_dir(model_dir: Path) -> dict[str, torch.Tensor]:
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise InputError(f"{model_dir}: no .safetensors files.")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def read_hf(model_dir: Path, runtime: bool = True) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """A unified-HF checkpoint (ours or ModelOpt's) → (ModelConfig, float32 state dict)."""
    d = Path(model_dir)
    config = json.loads((d / "config.json").read_text())
    cfg = ModelConfig.from_dict(config, str(d / "config.json"))
    qfile = d / "hf_quant_config.json"  # TensorRT-LLM reads this one first (modelopt_config.py)
    algo, group = (
        _quant_of(json.loads(qfile.read_text())["quantization"], qfile) if qfile.exists() else (None, None)
    )
    dtype = DTYPES.get(config.get("dtype") or config.get("torch_dtype")) if runtime else None
    raw = _load_dir(d)
    modules = {k.removesuffix(".weight_scale") for k in raw if k.endswith(".weight_scale")}
    state: dict[str, torch.Tensor] = {}
    for k, v in raw.items():
        module, _, leaf = k.rpartition(".")
        if module in modules and leaf != "bias":
            if leaf == "weight":
                parts = {
                    n: raw[f"{module}.{n}"]
                    for n in ("weight", "weight_scale", "pre_quant_scale")
                    if f"{module}.{n}" in raw
                }
                state[k] = dequant(algo, parts, group, dtype, "weight_scale", "pre_quant_scale")
            continue
        state[k] = v.float()
    return cfg, state


class LazyHFBundle:
    """read_hf one tensor at a time (validation reads the bundle layer by layer): `get(name, device)` reads that
    tensor's parts from disk, moves them to `device` and dequantizes there, exactly as read_hf does."""

    def __init__(self, model_dir: Path, runtime: bool = True):
        from lorafast_export.weights import WeightStore

        d = Path(model_dir)
        config = json.loads((d / "config.json").read_text())
        self.config = ModelConfig.from_dict(config, str(d / "config.json"))
        qfile = d / "hf_quant_config.json"
        self.algo, self.group = (
            _quant_of(json.loads(qfile.read_text())["quantization"], qfile)
            if qfile.exists()
            else (None, None)
        )
        self.dtype = DTYPES.get(config.get("dtype") or config.get("torch_dtype")) if runtime else None
        files = sorted(d.glob("*.safetensors"))
        if not files:
            raise InputError(f"{d}: no .safetensors files.")
        self.store = WeightStore(files)
        self.modules = {
            k.removesuffix(".weight_scale") for k in self.store.keys() if k.endswith(".weight_scale")
        }
        self._names = [
            k
            for k in self.store.keys()
            if k.rpartition(".")[0] not in self.modules or k.rpartition(".")[2] in ("weight", "bias")
        ]

    def keys(self) -> list[str]:
        return list(self._names)

    def __contains__(self, name: str) -> bool:
        return name in self._names

    def get(self, name: str, device="cpu") -> torch.Tensor:
        module, _, leaf = name.rpartition(".")
        if module in self.modules and leaf == "weight":
            parts = {
                n: self.store.get(f"{module}.{n}").to(device)
                for n in ("weight", "weight_scale", "pre_quant_scale")
                if f"{module}.{n}" in self.store
            }
            return dequant(self.algo, parts, self.group, self.dtype, "weight_scale", "pre_quant_scale")
        return self.store.get(name).to(device).float()


# -------------------------------------------------------------------------------------------- legacy


def read_legacy(model_dir: Path, hf_config: dict, runtime: bool = True) -> tuple[ModelConfig, dict]:
    """An engine checkpoint (ours or ModelOpt's) + the model's HF config → (ModelConfig, float32 state dict)."""
    d = Path(model_dir)
    tcfg = json.loads((d / "config.json").read_text())
    cfg = ModelConfig.from_dict(hf_config, "hf_config")
    algo, group = _quant_of(tcfg.get("quantization") or {}, d / "config.json", SUPPORTED_LEGACY)
    tp, pp = tcfg["mapping"]["tp_size"], tcfg["mapping"]["pp_size"]
    dtype = DTYPES.get(tcfg["dtype"]) if runtime else None
    ranks = {(r // tp, r % tp): load_file(str(d / f"rank{r}.safetensors")) for r in range(tp * pp)}
    state = {
        EMBED: _vocab(ranks, 0, tp, "transformer.vocab_embedding.weight", cfg.vocab_size),
        FINAL_NORM: ranks[(pp - 1, 0)]["transformer.ln_f.weight"].float(),
        LM_HEAD: _vocab(ranks, pp - 1, tp, "lm_head.weight", cfg.vocab_size),
    }
    per_stage = cfg.num_layers // pp
    for i in range(cfg.num_layers):
        shards = [ranks[(i // per_stage, r)] for r in range(tp)]
        state.update(
            _layer(cfg, shards, f"transformer.layers.{i % per_stage}.", layer_prefix(i), algo, group, dtype)
        )
    if cfg.tie_word_embeddings:
        state.pop(LM_HEAD)
    return cfg, state


def _vocab(ranks: dict, stage: int, tp: int, name: str, vocab: int) -> torch.Tensor:
    return torch.cat([ranks[(stage, r)][name] for r in range(tp)], dim=0)[:vocab].float()


def _layer(cfg: ModelConfig, shards: list[dict], src: str, dst: str, algo, group, dtype) -> dict:
    def deq(shard: dict, name: str) -> torch.Tensor:
        parts = {
            k.removeprefix(f"{src}{name}."): v for k, v in shard.items() if k.startswith(f"{src}{name}.")
        }
        return dequant(
            algo,
            parts,
            group,
            dtype,
            SCALE_KEYS.get(algo, "weights_scaling_factor"),
            "prequant_scaling_factor",
        )

    def bias(shard: dict, name: str) -> torch.Tensor | None:
        b = shard.get(f"{src}{name}.bias")
        return None if b is None else b.float()

    out = {
        f"{dst}input_layernorm.weight": shards[0][f"{src}input_layernorm.weight"].float(),
        f"{dst}post_attention_layernorm.weight": shards[0][f"{src}post_layernorm.weight"].float(),
    }
    tp = len(shards)
    widths = {
        "q_proj": cfg.num_heads * cfg.head_dim // tp,
        "k_proj": cfg.num_kv_heads * cfg.head_dim // tp,
        "v_proj": cfg.num_kv_heads * cfg.head_dim // tp,
        "gate_proj": cfg.intermediate_size // tp,
        "up_proj": cfg.intermediate_size // tp,
    }
    for name, projs in COLUMN.items():
        block = "self_attn" if name.startswith("attention") else "mlp"
        sizes = [widths[p] for p in projs]
        per_rank = [torch.split(deq(s, name), sizes, dim=0) for s in shards]  # each rank: (q_r, k_r, v_r)
        biases = [bias(s, name) for s in shards]
        for n, p in enumerate(projs):
            out[f"{dst}{block}.{p}.weight"] = torch.cat([w[n] for w in per_rank], dim=0)
            if biases[0] is not None:
                out[f"{dst}{block}.{p}.bias"] = torch.cat([torch.split(b, sizes)[n] for b in biases])
    for name, proj in ROW.items():
        block = "self_attn" if name.startswith("attention") else "mlp"
        out[f"{dst}{block}.{proj}.weight"] = torch.cat([deq(s, name) for s in shards], dim=1)
        if (b := bias(shards[0], name)) is not None:
            out[f"{dst}{block}.{proj}.bias"] = b
    return out


# ------------------------------------------------------------------------------- activations (W8A8)


def quantize_tokens(x: torch.Tensor) -> torch.Tensor:
    """TensorRT-LLM's dynamic per-token int8 quantization, quantized and dequantized: amax = max(max |x|, 1e-6) per
    token, q = x · (127 / amax) rounded half to even (cvt.rni.sat.s8.f32) and saturated to int8; the GEMM epilogue
    multiplies by amax / 127. x [..., in] → [..., in] in x's dtype."""
    xf = x.float()
    amax = xf.abs().amax(dim=-1, keepdim=True).clamp(min=1e-6)  # [..., 1]
    q = torch.round(xf * (127.0 / amax)).clamp(-128, 127)
    return (q * (amax / 127.0)).to(x.dtype)


class TokenQuantLinear(nn.Module):
    """A linear whose input is divided by `smoother` (row-parallel layers) and then quantized per token."""

    def __init__(self, linear: nn.Module, smoother: torch.Tensor | None, quantize=quantize_tokens):
        super().__init__()
        self.linear, self.quantize = linear, quantize
        self.register_buffer("smoother", smoother)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.smoother is not None:
            x = x / self.smoother.to(x.dtype)
        return self.linear(self.quantize(x))


def reference_decoder(model_dir: Path, runtime: bool = True, quantize=quantize_tokens) -> Decoder:
    """The canonical decoder computing what TensorRT-LLM computes from the bundle: the read weights and, for a W8A8
    SmoothQuant engine checkpoint, every decoder linear's input quantized per token (`quantize` replaceable, so a
    test can swap in our own fake-quant and compare bit for bit)."""
    cfg, state = read_bundle(Path(model_dir), runtime)
    dec = build_decoder(cfg, state, torch.float32)
    smoothers = read_smoothers(Path(model_dir))
    if smoothers is None:
        return dec
    for i, layer in enumerate(dec.model.layers):
        for rel, lin in layer.linears().items():
            block, leaf = rel.split(".")
            wrapped = TokenQuantLinear(lin, smoothers.get(f"{layer_prefix(i)}{rel}"), quantize)
            setattr(getattr(layer, block), leaf, wrapped)
    return dec


def read_smoothers(model_dir: Path) -> dict[str, torch.Tensor] | None:
    """A W8A8 SmoothQuant engine checkpoint → {HF module of o_proj / down_proj: smoother [in]}; None otherwise."""
    d = Path(model_dir)
    meta = read_meta(d)
    if meta["layout"] != "legacy":
        return None
    tcfg = json.loads((d / "config.json").read_text())
    if (tcfg.get("quantization") or {}).get("quant_algo") != W8A8_SQ:
        return None
    cfg = ModelConfig.from_dict(meta["hf_config"], "hf_config")
    tp, pp = tcfg["mapping"]["tp_size"], tcfg["mapping"]["pp_size"]
    per_stage = cfg.num_layers // pp
    out = {}
    for i in range(cfg.num_layers):
        for name, proj in ROW.items():
            block = "self_attn" if name.startswith("attention") else "mlp"
            key = f"transformer.layers.{i % per_stage}.{name}.smoother"
            parts = []
            for r in range(tp):
                with safe_open(str(d / f"rank{(i // per_stage) * tp + r}.safetensors"), "pt") as f:
                    parts.append(f.get_tensor(key).float().reshape(-1))  # [1, in/tp] each
            out[f"{layer_prefix(i)}{block}.{proj}"] = torch.cat(parts)
    return out
