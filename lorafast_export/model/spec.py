"""Per-family knowledge as data, and the parsed model configuration.

We read config.json ourselves (not through transformers' config classes) because configs written by
transformers 5 store rope settings as `rope_parameters`, while 4.x writes `rope_theta` + `rope_scaling`;
either library silently drops the other's form. `ModelConfig.from_dict` understands both.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lorafast_export.errors import InputError, UnsupportedError
from lorafast_export.safeio import LIMITS, read_text

ATTN_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJ = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class FamilySpec:
    """What differs between the decoder families we support. Tensor names are shared (HF Llama layout)."""

    name: str
    model_types: tuple[str, ...]
    architectures: tuple[str, ...]
    qkv_bias_default: bool = False  # Qwen2 has biases on q/k/v
    has_sliding_window: bool = False


FAMILIES: dict[str, FamilySpec] = {
    "llama": FamilySpec("llama", ("llama",), ("LlamaForCausalLM",)),
    "mistral": FamilySpec("mistral", ("mistral",), ("MistralForCausalLM",), has_sliding_window=True),
    "qwen2": FamilySpec("qwen2", ("qwen2",), ("Qwen2ForCausalLM",), qkv_bias_default=True),
}

# Tensor names, relative to the root of a causal-LM checkpoint (HF layout shared by all families above).
EMBED = "model.embed_tokens.weight"
FINAL_NORM = "model.norm.weight"
LM_HEAD = "lm_head.weight"


def layer_prefix(i: int) -> str:
    return f"model.layers.{i}."


def linear_module_names(i: int) -> list[str]:
    """Module paths (no `.weight`) of the linears of decoder layer i, in execution order."""
    p = layer_prefix(i)
    return [f"{p}self_attn.{n}" for n in ATTN_PROJ] + [f"{p}mlp.{n}" for n in MLP_PROJ]


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    type: str = "default"  # default | linear | llama3
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None


SUPPORTED_ROPE = ("default", "linear", "llama3")


@dataclass(frozen=True)
class ModelConfig:
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    rope: RopeConfig = field(default_factory=RopeConfig)
    sliding_window: int | None = None
    torch_dtype: str = "float32"
    raw: dict = field(default_factory=dict, compare=False, repr=False)

    @staticmethod
    def from_dict(cfg: dict[str, Any], source: str = "config.json") -> ModelConfig:
        return _parse_config(cfg, source)

    @staticmethod
    def from_file(path: str | Path) -> ModelConfig:
        path = Path(path)
        if not path.exists() and not path.is_symlink():
            raise InputError(f"{path}: not found. A model directory needs a config.json.")
        try:
            cfg = json.loads(read_text(path, "config.json", LIMITS["config"]))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise InputError(f"{path}: not valid JSON ({e}). Re-save the model's config.") from None
        if not isinstance(cfg, dict):
            raise InputError(f"{path}: expected a JSON object, got {type(cfg).__name__}.")
        return _parse_config(cfg, str(path))

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("raw")
        return d


def family_of(cfg: dict, source: str) -> FamilySpec:
    model_type = cfg.get("model_type")
    archs = cfg.get("architectures") or []
    for fam in FAMILIES.values():
        if model_type in fam.model_types:
            return fam
    supported = ", ".join(f"{f.name} ({'/'.join(f.architectures)})" for f in FAMILIES.values())
    raise UnsupportedError(
        f"{source}: model_type={model_type!r} (architectures={archs}) is not supported. "
        f"Supported families: {supported}."
    )


def _parse_rope(cfg: dict, source: str, problems: list[str]) -> RopeConfig:
    # transformers 5: rope_parameters = {"rope_type": ..., "rope_theta": ..., ...}
    # transformers 4: rope_theta at top level + rope_scaling = {"rope_type"|"type": ..., ...} or None
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and "full_attention" in params:  # per-layer-type form
        params = params["full_attention"]
    for key, value in (("rope_parameters", params), ("rope_scaling", cfg.get("rope_scaling"))):
        if value is not None and not isinstance(value, dict):
            problems.append(f"{key} must be an object or null, got {value!r}")
    scaling = dict(params) if isinstance(params, dict) else dict(_as_dict(cfg.get("rope_scaling")))
    rtype = scaling.get("rope_type", scaling.get("type", "default")) or "default"
    if rtype not in SUPPORTED_ROPE:
        raise UnsupportedError(
            f"{source}: rope type {rtype!r} is not supported (supported: {', '.join(SUPPORTED_ROPE)}). "
            "Dynamic rope types change with sequence length and cannot be exported as one static graph."
        )
    theta_src = scaling if "rope_theta" in scaling else cfg
    orig = _field(scaling, "original_max_position_embeddings", problems, _positive_int, None)
    return RopeConfig(
        theta=_field(theta_src, "rope_theta", problems, _positive_float, 10000.0),
        type=rtype,
        factor=_field(scaling, "factor", problems, _positive_float, 1.0),
        low_freq_factor=_field(scaling, "low_freq_factor", problems, _positive_float, 1.0),
        high_freq_factor=_field(scaling, "high_freq_factor", problems, _positive_float, 4.0),
        original_max_position_embeddings=orig,
    )


def _as_dict(v: object) -> dict:
    return v if isinstance(v, dict) else {}


# Field readers: each returns the value or None (and says why in `problems`). JSON true/false are not numbers,
# and "4" is not 4: a config written by hand or by a broken tool is refused, never coerced.
def _positive_int(v: object) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None


def _positive_float(v: object) -> float | None:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
    return float(v) if ok else None


def _boolean(v: object) -> bool | None:
    return v if isinstance(v, bool) else None


_WANT = {
    _positive_int: "a positive integer",
    _positive_float: "a positive finite number",
    _boolean: "true or false",
}


def _field(cfg: dict, key: str, problems: list[str], read, default, required: bool = False):
    """cfg[key] read by `read`; a missing or null key gives `default` (or a problem when required)."""
    value = cfg.get(key)
    if value is None:
        if required:
            problems.append(f"{key} is missing ({_WANT[read]} required)")
        return default
    parsed = read(value)
    if parsed is None:
        problems.append(f"{key} must be {_WANT[read]}, got {json.dumps(value)}")
        return default
    return parsed


_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def _parse_config(cfg: dict, source: str) -> ModelConfig:
    fam = family_of(cfg, source)
    problems: list[str] = []
    req = {k: _field(cfg, k, problems, _positive_int, 1, required=True) for k in _REQUIRED}
    heads, hidden = req["num_attention_heads"], req["hidden_size"]
    kv = _field(cfg, "num_key_value_heads", problems, _positive_int, heads)
    head_dim = _field(cfg, "head_dim", problems, _positive_int, None)
    if head_dim is None and hidden % heads and not problems:
        problems.append(
            f"hidden_size={hidden} is not a multiple of num_attention_heads={heads}; give head_dim explicitly"
        )
    if heads % kv and not problems:
        problems.append(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv}")
    opts = {
        "rms_norm_eps": _field(cfg, "rms_norm_eps", problems, _positive_float, 1e-6),
        "max_position_embeddings": _field(cfg, "max_position_embeddings", problems, _positive_int, 2048),
        "tie_word_embeddings": _field(cfg, "tie_word_embeddings", problems, _boolean, False),
        "attention_bias": _field(cfg, "attention_bias", problems, _boolean, None),
        "mlp_bias": _field(cfg, "mlp_bias", problems, _boolean, False),
        "use_sliding_window": _field(cfg, "use_sliding_window", problems, _boolean, False),
        "sliding_window": _field(cfg, "sliding_window", problems, _positive_int, None),
    }
    rope = _parse_rope(cfg, source, problems)
    dtype = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    if not isinstance(dtype, str):
        problems.append(f'dtype/torch_dtype must be a string such as "float16", got {json.dumps(dtype)}')
    if problems:
        raise InputError(
            f"{source}: {len(problems)} problem(s) in the model config:\n  - "
            + "\n  - ".join(problems)
            + "\nIs this the config.json of a causal LM checkpoint? Fix these fields (see the model's card)."
        )
    attn_bias = opts["attention_bias"]
    attn_bias = fam.qkv_bias_default if attn_bias is None else attn_bias
    sliding = opts["sliding_window"] if (fam.has_sliding_window or opts["use_sliding_window"]) else None
    return ModelConfig(
        family=fam.name,
        vocab_size=req["vocab_size"],
        hidden_size=hidden,
        intermediate_size=req["intermediate_size"],
        num_layers=req["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=kv,
        head_dim=head_dim or hidden // heads,
        rms_norm_eps=opts["rms_norm_eps"],
        max_position_embeddings=opts["max_position_embeddings"],
        tie_word_embeddings=opts["tie_word_embeddings"],
        qkv_bias=attn_bias or fam.qkv_bias_default,
        o_bias=bool(opts["attention_bias"]) and fam.name != "qwen2",
        mlp_bias=opts["mlp_bias"],
        rope=rope,
        sliding_window=sliding,
        torch_dtype=str(dtype),
        raw=cfg,
    )


def rope_inv_freq(cfg: ModelConfig) -> tuple[torch.Tensor, float]:  # noqa: F821
    """Inverse frequencies [head_dim/2] and the cos/sin scaling factor for this model's rope variant."""
    import torch

    r, dim = cfg.rope, cfg.head_dim
    inv = 1.0 / (r.theta ** (torch.arange(0, dim, 2, dtype=torch.int64).double() / dim))
    if r.type == "default":
        return inv.float(), 1.0
    if r.type == "linear":
        return (inv / r.factor).float(), 1.0
    if r.type == "llama3":
        old_ctx = r.original_max_position_embeddings or cfg.max_position_embeddings
        low_wl, high_wl = old_ctx / r.low_freq_factor, old_ctx / r.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wl, inv / r.factor, inv)
        smooth = (old_ctx / wavelen - r.low_freq_factor) / (r.high_freq_factor - r.low_freq_factor)
        smoothed = (1 - smooth) * scaled / r.factor + smooth * scaled
        medium = (wavelen >= high_wl) & (wavelen <= low_wl)
        return torch.where(medium, smoothed, scaled).float(), 1.0
    raise UnsupportedError(f"rope type {r.type!r} is not supported")
