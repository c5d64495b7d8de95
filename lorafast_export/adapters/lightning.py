"""Adapters saved inside PyTorch Lightning checkpoints (.ckpt).

A Lightning checkpoint is a pickle: like any pickle it is refused unless --allow-pickle, and is then read with
torch.load(weights_only=True). The LoRA/DoRA tensors are found by their PEFT names anywhere in the state dict
(`model.base_model.model.…q_proj.lora_A.default.weight`, with or without a module prefix or adapter name);
the rank comes from the tensors, DoRA from the presence of magnitude vectors, and alpha (+ rsLoRA) from the
checkpoint's hyperparameters (flat, or nested under peft_config / lora_config / lora / adapter) or from the
adapter spec's overrides.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from lorafast_export.adapters.peft import adapter_from_tensors, check_lora_config
from lorafast_export.errors import InputError

_KEY = re.compile(
    r"(?:^|.*?\.)(?:base_model\.model\.)?(?P<module>model\.(?:embed_tokens|layers\.\d+\.[\w.]+?)|lm_head)"
    r"\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)"
    r"(?:\.(?P<adapter>[\w-]+))?(?:\.weight)?$"
)
_HPARAM_NESTS = ("peft_config", "lora_config", "lora", "adapter", "adapter_config")
_ALIASES = {
    "r": ("r", "lora_r", "rank", "lora_rank"),
    "lora_alpha": ("lora_alpha", "alpha"),
    "use_rslora": ("use_rslora", "rslora"),
    "use_dora": ("use_dora", "dora"),
}


def _hparams(ckpt: dict) -> dict:
    hp = dict(ckpt.get("hyper_parameters") or {})
    for nest in _HPARAM_NESTS:
        if isinstance(hp.get(nest), dict):
            hp = {**hp, **hp[nest]}
    out = {}
    for field, names in _ALIASES.items():
        for n in names:
            if n in hp:
                out[field] = hp[n]
                break
    return out


def peft_tensors(state: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """PEFT-format adapter tensors (base_model.model.<module>.<kind>[.weight]) from a training state dict."""
    out, adapters = {}, set()
    for key, t in state.items():
        m = _KEY.match(key)
        if not m or not torch.is_tensor(t):
            continue
        adapters.add(m.group("adapter") or "")
        kind = m.group("kind")
        suffix = ".weight" if kind in ("lora_A", "lora_B") else ""
        out[f"base_model.model.{m.group('module')}.{kind}{suffix}"] = t
    if not out:
        raise InputError(
            f"{path}: no LoRA/DoRA tensors (lora_A/lora_B) found in the checkpoint's state_dict; "
            "is this the checkpoint of a PEFT-wrapped model?"
        )
    if len(adapters) > 1:
        raise InputError(
            f"{path}: the checkpoint holds several adapters ({', '.join(sorted(adapters))}); "
            "export each with peft's save_pretrained and pass them separately."
        )
    return out


def open_lightning_adapter(path: Path, weight: float, allow_pickle: bool, overrides: dict | None = None):
    if not allow_pickle:
        raise InputError(
            f"{path}: a Lightning checkpoint is a pickle and is refused by default. Pass "
            "--allow-pickle to read it with torch.load(weights_only=True)."
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised as InputError naming the file
        raise InputError(
            f"{path}: cannot be read with torch.load(weights_only=True) ({type(e).__name__}: {e})."
        ) from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise InputError(f"{path}: not a Lightning checkpoint (no 'state_dict').")
    tensors = peft_tensors(ckpt["state_dict"], path)
    cfg = {
        "peft_type": "LORA",
        **_hparams(ckpt),
        **{k: v for k, v in (overrides or {}).items() if v is not None},
    }
    if "r" not in cfg:  # the tensors say the rank; varying ranks become an exact rank_pattern
        by_module = {
            k.rsplit(".lora_", 1)[0].removeprefix("base_model.model."): t.shape[0]
            for k, t in tensors.items()
            if ".lora_A" in k or ".lora_embedding_A" in k
        }
        cfg["r"] = max(set(by_module.values()), key=list(by_module.values()).count)
        cfg["rank_pattern"] = {re.escape(m): r for m, r in by_module.items() if r != cfg["r"]}
    if "lora_alpha" not in cfg:
        raise InputError(
            f"{path}: lora_alpha is not in the checkpoint's hyper_parameters; give it in the adapter "
            "spec, e.g. --adapter 'epoch=3.ckpt' --lora-alpha 32."
        )
    cfg.setdefault("use_dora", any("lora_magnitude_vector" in k for k in tensors))
    check_lora_config(cfg, path)
    return adapter_from_tensors(path, cfg, tensors, weight, [path])
