"""`inspect` and `doctor`: describe inputs and the environment. Read-only."""

from __future__ import annotations

import re
from pathlib import Path

from lorafast_export.errors import InputError
from lorafast_export.paths import resolve_path
from lorafast_export.specs import QUANT_CHOICES


def describe(path: str, allow_pickle: bool = False) -> dict:
    p = resolve_path(path)
    if (p / "adapter_config.json").exists() or p.suffix == ".ckpt":
        return describe_adapter(str(p), allow_pickle)
    if (p / "config.json").exists():
        return describe_model(p, allow_pickle)
    raise InputError(
        f"{p}: neither an adapter (adapter_config.json / .ckpt) nor a model directory (config.json)."
    )


def describe_adapter(path: str, allow_pickle: bool) -> dict:
    from lorafast_export.adapters import open_adapter

    ad = open_adapter(path, allow_pickle)
    ranks = sorted({m.a.shape[0] for m in ad.modules.values()})
    layers = sorted({int(x) for m in ad.modules for x in re.findall(r"layers\.(\d+)\.", m)})
    kinds = sorted({m.rsplit(".", 1)[-1] for m in ad.modules})
    n_params = sum(
        m.a.numel() + m.b.numel() + (0 if m.magnitude is None else m.magnitude.numel())
        for m in ad.modules.values()
    )
    return {
        "path": str(ad.path),
        "type": ad.kind,
        "peft_type": ad.config.get("peft_type"),
        "rank": ranks[0] if len(ranks) == 1 else ranks,
        "alpha": ad.config.get("lora_alpha"),
        "use_rslora": bool(ad.config.get("use_rslora")),
        "use_dora": ad.use_dora,
        "target_modules": kinds,
        "layers": f"{layers[0]}-{layers[-1]} ({len(layers)})" if layers else "none",
        "adapted_modules": len(ad.modules),
        "modules_to_save": sorted(ad.replacements),
        "rank_pattern": ad.config.get("rank_pattern") or {},
        "alpha_pattern": ad.config.get("alpha_pattern") or {},
        "adapter_parameters": n_params,
        "expects_base": ad.config.get("base_model_name_or_path") or "(not recorded)",
    }


def describe_model(p: Path, allow_pickle: bool) -> dict:
    from lorafast_export.weights import open_model

    m = open_model(p, allow_pickle)
    c = m.config
    return {
        "path": str(p),
        "family": c.family,
        "layers": c.num_layers,
        "hidden_size": c.hidden_size,
        "heads": f"{c.num_heads} (kv {c.num_kv_heads})",
        "vocab_size": c.vocab_size,
        "rope": f"{c.rope.type} theta={c.rope.theta:g}"
        + (f" factor={c.rope.factor:g}" if c.rope.type != "default" else ""),
        "tied_embeddings": c.tie_word_embeddings,
        "dtype": c.torch_dtype,
        "weight_files": [f.name for f in m.store.files],
        "tokenizer_files": [f.name for f in m.tokenizer_files],
    }


def environment_report() -> dict:
    import torch

    from lorafast_export.errors import RuntimeMissingError
    from lorafast_export.manifest import library_versions
    from lorafast_export.targets.registry import all_targets, get_target

    targets = []
    for name in all_targets():
        try:
            ok, hint = get_target(name).available()
        except RuntimeMissingError as e:
            ok, hint = False, str(e)
        targets.append({"name": name, "ok": ok, "hint": hint})
    methods = []
    for name in QUANT_CHOICES:
        if name == "none":
            continue
        try:
            from lorafast_export.quant.walk import METHODS

            ok = name in METHODS
        except ModuleNotFoundError:
            ok = False
        methods.append(
            {"name": name, "ok": ok, "hint": "ready" if ok else "not implemented in this version yet"}
        )
    devices = ["cpu"] + ([f"cuda ({torch.cuda.get_device_name(0)})"] if torch.cuda.is_available() else [])
    rep = {"targets": targets, "quant_methods": methods, "devices": devices, "versions": library_versions()}
    if torch.cuda.is_available():
        rep["int4_kernel_table"] = int4_table_status(torch.cuda.get_device_name(0))
    return rep


def int4_table_status(gpu: str) -> str:
    """Where the torch-compile runtime's int4 kernel choices come from on this GPU (doctor)."""
    from lorafast_export.runtime.int4_table import table_file, user_table_file

    if user_table_file(gpu).is_file():
        return f"measured here by tune-kernels ({user_table_file(gpu)})"
    if table_file(gpu).is_file():
        return f"shipped ({table_file(gpu).name}); tune-kernels measures shapes it lacks"
    return (
        "none for this GPU: int4 layers run our GEMM_W kernel with tiles by rule (128-column groups, compute "
        "capability 8.0+; else tinygemm), unfused; run `lorafast-export tune-kernels --model ARTIFACT`"
    )
