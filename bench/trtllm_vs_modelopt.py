"""NVIDIA ModelOpt vs target trt-llm: the same merged model, exported by ModelOpt and lowered by lorafast-export.

    python bench/trtllm_vs_modelopt.py --modelopt-python /tmp/mo/bin/python [--work DIR] [--write-golden]

ModelOpt runs in its own virtual environment (it must not change this one's torch/transformers), e.g.
    python3 -m venv /tmp/mo && /tmp/mo/bin/pip install torch==2.13.0 transformers==5.17.0 \
        nvidia-modelopt==0.47.0 requests safetensors
This script re-runs itself there with --worker: quantize (INT8_WEIGHT_ONLY_CFG, INT4_AWQ_CFG with block size 64,
INT8_SMOOTHQUANT_CFG, or nothing), export_hf_checkpoint and export_tensorrt_llm_checkpoint (tp 1, tp 2, tp 1 x pp 2),
and dump ModelOpt's own fake-quant weights and fp32 logits. Then, here:
  1. layout: our bundle vs ModelOpt's for the same method: tensor names, dtypes, shapes per file, config keys and
     values (values the algorithms choose, i.e. the tensors' numbers, are not compared). SmoothQuant: ModelOpt's
     W8A8_SQ_PER_CHANNEL (static per-tensor activation scale) is first mapped onto our per-token plugin layout by
     lorafast_export/targets/trt_llm/layout.py `modelopt_sq_as_ours` (every renamed, dropped and added tensor listed);
  2. reading: our reader (trt/reader.py) on ModelOpt's files vs ModelOpt's fake-quant weights and logits;
  3. --write-golden: ModelOpt's layouts as tests/targets/golden/*.json, which tests/targets/test_trtllm.py checks
     our output against without ModelOpt.
Results are printed as markdown (bench/TRTLLM.md records a run).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "targets" / "golden"
MODELOPT_CFGS = {
    "none": None,
    "int8": "INT8_WEIGHT_ONLY_CFG",
    "awq": "INT4_AWQ_CFG",
    "smoothquant": "INT8_SMOOTHQUANT_CFG",
}
LAYOUTS = {
    "hf": {},
    "legacy_tp1": {"legacy": True},
    "legacy_tp2": {"legacy": True, "tp": 2},
    "legacy_tp1pp2": {"legacy": True, "pp": 2},
}
MODELS = {  # tiny fp16 models: big enough for group 64 per tensor-parallel shard
    "llama": dict(family="llama", hidden=128, intermediate_size=256, heads=4, kv_heads=2, vocab=96, layers=2),
    "qwen2": dict(family="qwen2", hidden=128, intermediate_size=256, heads=4, kv_heads=2, vocab=96, layers=2),
}
CASES = [("llama", m) for m in MODELOPT_CFGS] + [
    ("qwen2", "int8"),
    ("qwen2", "awq"),
    ("qwen2", "smoothquant"),
]
GROUP_SIZE = 64
IGNORED_CONFIG_KEYS = ("producer", "rank")  # who wrote it; which rank wrote config.json last


# ------------------------------------------------------------------------------------- ModelOpt side


def worker(base: str, out: str, method: str) -> None:  # runs in the ModelOpt venv: no lorafast imports
    import copy

    import modelopt
    import modelopt.torch.quantization as mtq
    import torch
    import transformers
    from modelopt.torch.export import export_hf_checkpoint, export_tensorrt_llm_checkpoint
    from safetensors.torch import save_file

    out_dir = Path(out)
    cfg = copy.deepcopy(getattr(mtq, MODELOPT_CFGS[method])) if MODELOPT_CFGS[method] else None
    for entry in (cfg or {}).get("quant_cfg", []):
        if entry.get("quantizer_name") == "*weight_quantizer" and "block_sizes" in entry.get("cfg", {}):
            entry["cfg"]["block_sizes"] = {-1: GROUP_SIZE, "type": "static"}
    ids = torch.randint(0, 96, (4, 32), generator=torch.Generator().manual_seed(0))
    decoder = json.loads((Path(base) / "config.json").read_text())["model_type"]
    decoder = {"qwen2": "qwen"}.get(decoder, decoder)

    def model():
        m = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float16).eval()
        if cfg is not None:
            m = mtq.quantize(m, cfg, lambda mm: [mm(ids[i : i + 1]) for i in range(len(ids))])
        return m

    # ModelOpt's fake-quant reference in float32 (its float16 fake-quant rounds exact x.5 ties differently from its
    # float32 exporter), twice: "raw" as calibrated, and "res" after the re-smoothing its exporters apply to
    # modules sharing an input (one averaged pre_quant_scale, weights re-quantized; the HF export then folds it
    # into the norm, the engine export keeps it on the fused qkv).
    fq = {}
    for tag in ("raw", "res"):
        m = model()
        if tag == "res" and cfg is not None:
            from modelopt.torch.export.unified_export_hf import requantize_resmooth_fused_llm_layers

            requantize_resmooth_fused_llm_layers(m)
        m = m.float()
        for name, mod in m.named_modules():
            if hasattr(mod, "weight_quantizer") and mod.weight_quantizer.is_enabled:
                with torch.no_grad():
                    fq[f"{tag}.{name}.weight"] = mod.weight_quantizer(mod.weight).float().contiguous()
                pqs = getattr(mod.input_quantizer, "_pre_quant_scale", None)
                if pqs is not None:
                    fq[f"{tag}.{name}.pre_quant_scale"] = pqs.float().contiguous()
        with torch.no_grad():
            fq[f"{tag}.logits"] = m(ids[:1]).logits[0].float().contiguous()
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(fq, str(out_dir / "fake_quant.safetensors"))
    export_hf_checkpoint(model(), export_dir=out_dir / "hf")
    for layout, o in LAYOUTS.items():
        if o.get("legacy"):
            export_tensorrt_llm_checkpoint(
                model(),
                decoder,
                torch.float16,
                export_dir=out_dir / layout,
                inference_tensor_parallel=o.get("tp", 1),
                inference_pipeline_parallel=o.get("pp", 1),
            )
    (out_dir / "modelopt.json").write_text(
        json.dumps(
            {
                "version": modelopt.__version__,
                "config": MODELOPT_CFGS[method],
                "group_size": GROUP_SIZE if method == "awq" else None,
            }
        )
    )


# ------------------------------------------------------------------------------------------ our side


def compare_layouts(ours: dict, ref: dict) -> dict:
    """Differences of our layout against the reference's (empty lists: identical)."""
    from lorafast_export.targets.trt_llm.layout import flat_config

    diff = {
        "tensor_files": sorted(set(ours["tensors"]) ^ set(ref["tensors"])),
        "missing": [],
        "extra": [],
        "dtype_or_shape": [],
        "config_missing": [],
        "config_extra": [],
        "config_values": [],
    }
    for f in sorted(set(ours["tensors"]) & set(ref["tensors"])):
        a, b = ours["tensors"][f], ref["tensors"][f]
        diff["missing"] += [f"{f}:{k}" for k in sorted(set(b) - set(a))]
        diff["extra"] += [f"{f}:{k}" for k in sorted(set(a) - set(b))]
        diff["dtype_or_shape"] += [
            f"{f}:{k} ours {a[k]} ref {b[k]}" for k in sorted(set(a) & set(b)) if a[k] != b[k]
        ]
    for name, rc in ref["configs"].items():
        oc, rc = (flat_config(c, IGNORED_CONFIG_KEYS) for c in (ours["configs"].get(name, {}), rc))
        diff["config_missing"] += [f"{name}:{k}" for k in sorted(set(rc) - set(oc))]
        diff["config_extra"] += [f"{name}:{k}" for k in sorted(set(oc) - set(rc))]
        diff["config_values"] += [
            f"{name}:{k} ours {oc[k]!r} ref {rc[k]!r}" for k in sorted(set(oc) & set(rc)) if oc[k] != rc[k]
        ]
    return diff


def make_base(family: str, out: Path) -> Path:
    import torch

    sys.path.insert(0, str(ROOT))
    from lorafast_export.testing import make_model, save_char_tokenizer, save_model

    kw = {k: v for k, v in MODELS[family].items() if k != "family"}
    save_model(make_model(family, dtype=torch.float16, **kw), out)
    save_char_tokenizer(out)
    return out


def lower_ours(base: Path, method: str, out: Path) -> dict[str, Path | str]:
    """Our bundle for every layout, or the refusal message."""
    import torch

    from lorafast_export.model.spec import ModelConfig
    from lorafast_export.quant.walk import quantize_checkpoint
    from lorafast_export.recipe import Recipe
    from lorafast_export.targets.registry import LowerInput, get_target

    cfg = ModelConfig.from_file(base / "config.json")
    settings = {
        "none": None,
        "int8": {"method": "int8"},
        "awq": {"method": "awq", "group_size": GROUP_SIZE, "symmetric": True},
        "smoothquant": {"method": "smoothquant"},
    }[method]
    ids = torch.randint(0, 96, (4, 32), generator=torch.Generator().manual_seed(0))
    qm = None if settings is None else quantize_checkpoint(base, {**settings, "device": "cpu"}, calib_ids=ids)
    result: dict[str, Path | str] = {}
    for name, opts in LAYOUTS.items():
        try:  # a refusal, when the recipe is read or at lowering, is a result here
            recipe = Recipe.from_dict(
                {"quant": {"method": method}, "target": {"name": "trt-llm", "options": opts}}
            )
            get_target("trt-llm").lower(LowerInput(base, cfg, recipe, qm), out / name)
            result[name] = out / name
        except Exception as e:  # noqa: BLE001 (a refusal is a result here)
            result[name] = f"refused: {str(e).splitlines()[1].strip(' -') if chr(10) in str(e) else e}"
    return result


def _one_step(diff, step) -> bool:
    """Every differing element differs by exactly one quantization step (a tie rounded the other way)."""
    import torch

    bad = diff.abs() > 1e-6
    return bool(torch.allclose(diff.abs()[bad], step[bad], rtol=1e-3)) if bad.any() else True


def read_check(base: Path, mo_dir: Path, method: str) -> dict:
    """Our reader on ModelOpt's exports vs ModelOpt's own fake-quant weights (pre_quant_scale applied) and logits.

    The reference per module is the model ModelOpt exported it from: the HF export is the re-smoothed model
    (pre_quant_scale of q/k/v and gate/up folded into the norms); the engine export re-smooths only the fused
    qkv (its averaged pre_quant_scale stays in the file) and keeps per-module scales elsewhere, so no single
    ModelOpt model equals it and its logits are not compared.
    """
    import torch
    from safetensors.torch import load_file

    from lorafast_export.model.decoder import build_decoder
    from lorafast_export.targets.trt_llm.reader import read_hf, read_legacy

    fq = load_file(str(mo_dir / "fake_quant.safetensors"))
    hf_config = json.loads((base / "config.json").read_text())
    ids = torch.randint(0, 96, (4, 32), generator=torch.Generator().manual_seed(0))[:1]
    out = {}
    for name in LAYOUTS:
        try:
            cfg, st = (
                read_hf(mo_dir / name, runtime=False)
                if name == "hf"
                else read_legacy(mo_dir / name, hf_config, runtime=False)
            )
        except Exception as e:  # noqa: BLE001 (a format we do not read is a result here)
            out[name] = f"not read: {e}"
            continue
        worst, n_diff, n_all, one_step = 0.0, 0, 0, True
        for k in [k for k in fq if k.startswith("res.") and k.endswith(".weight")]:
            mod = k.removeprefix("res.").removesuffix(".weight")
            qkv = mod.endswith(("q_proj", "k_proj", "v_proj"))
            tag = "res" if name == "hf" or qkv else "raw"
            w, pqs = fq[f"{tag}.{mod}.weight"], fq.get(f"{tag}.{mod}.pre_quant_scale")
            if name != "hf" and qkv and method == "awq":  # the engine file keeps the averaged scale
                pqs = _qkv_pqs(mo_dir / name, int(mod.split(".")[2]))
            want = w if pqs is None else w * pqs[None, :]
            d = st[f"{mod}.weight"] - want
            step = _step(mod, name, mo_dir, st, pqs)
            worst, n_diff, n_all = (
                max(worst, float(d.abs().max())),
                n_diff + int((d.abs() > 1e-6).sum()),
                n_all + d.numel(),
            )
            one_step = one_step and (step is None or _one_step(d, step))
        r = {
            "max_abs_weight_diff": worst,
            "elements_differing": n_diff,
            "elements": n_all,
            "all_differences_one_step": one_step,
        }
        if name == "hf":
            # the same decoder with ModelOpt's fake-quant weights in place of the files': isolates the ties
            swapped = dict(st)
            for k in [k for k in fq if k.startswith("res.") and k.endswith(".weight")]:
                mod = k.removeprefix("res.").removesuffix(".weight")
                pqs = fq.get(f"res.{mod}.pre_quant_scale")
                swapped[f"{mod}.weight"] = fq[k] if pqs is None else fq[k] * pqs[None, :]
            with torch.no_grad():
                logits = build_decoder(cfg, st, torch.float32)(ids)[0][0]
                logits_fq = build_decoder(cfg, swapped, torch.float32)(ids)[0][0]
            r["max_abs_logit_diff_vs_modelopt_fake_quant"] = float((logits - fq["res.logits"]).abs().max())
            r["same_with_modelopt_fake_quant_weights"] = float((logits_fq - fq["res.logits"]).abs().max())
        out[name] = r
    return out


def _qkv_pqs(d: Path, layer: int):
    """prequant_scaling_factor of the fused qkv of global layer `layer` in an engine checkpoint (replicated)."""
    from safetensors import safe_open

    mapping = json.loads((d / "config.json").read_text())["mapping"]
    per_stage = json.loads((d / "config.json").read_text())["num_hidden_layers"] // mapping["pp_size"]
    rank = (layer // per_stage) * mapping["tp_size"]
    with safe_open(str(d / f"rank{rank}.safetensors"), "pt") as f:
        return f.get_tensor(
            f"transformer.layers.{layer % per_stage}.attention.qkv.prequant_scaling_factor"
        ).float()


def _step(mod: str, layout: str, mo_dir: Path, st, pqs):
    """The quantization step of every element of one module's weight (scale x pre_quant_scale), from the
    unsharded file of the same export: the HF file, or the engine checkpoint at tp 1 (same scales at any tp)."""
    import torch
    from safetensors.torch import load_file

    w = st[f"{mod}.weight"]
    if layout == "hf":
        scale = load_file(str(mo_dir / "hf" / "model.safetensors")).get(f"{mod}.weight_scale")
    else:
        scale = _legacy_scale(mo_dir / "legacy_tp1", mod, w.shape[0])
    if scale is None:
        return None
    full = (
        scale[:, None].expand_as(w) if scale.dim() == 1 else scale[:, torch.arange(w.shape[1]) // GROUP_SIZE]
    )
    return full * (1 if pqs is None else pqs[None, :])


def _legacy_scale(d: Path, mod: str, rows: int):
    from safetensors.torch import load_file

    names = {
        "q_proj": ("attention.qkv", 0),
        "k_proj": ("attention.qkv", 1),
        "v_proj": ("attention.qkv", 2),
        "o_proj": ("attention.dense", 0),
        "gate_proj": ("mlp.fc", 0),
        "up_proj": ("mlp.gate", 0),
        "down_proj": ("mlp.proj", 0),
    }
    layer, proj = int(mod.split(".")[2]), mod.split(".")[-1]
    name, part = names[proj]
    scale = load_file(str(d / "rank0.safetensors")).get(
        f"transformer.layers.{layer}.{name}.weights_scaling_factor"
    )
    if scale is None:
        return None
    if name == "attention.qkv":  # rows: q (largest) then k, v of equal size
        kv = (scale.shape[0] - rows) // 2 if part == 0 else rows
        q = scale.shape[0] - 2 * kv
        scale = torch_split(scale, [q, kv, kv])[part]
    return scale


def torch_split(t, sizes):
    import torch

    return torch.split(t, sizes, dim=0)


def run(mo_python: str, work: Path, write_golden: bool, only: list[str] | None = None) -> dict:
    from lorafast_export.targets.trt_llm.layout import layout, modelopt_sq_as_ours

    results = {}
    for family, method in CASES:
        if only and f"{family}/{method}" not in only:
            continue
        base = (
            make_base(family, work / family / "base")
            if not (work / family / "base").exists()
            else work / family / "base"
        )
        mo_dir = work / family / f"modelopt-{method}"
        if not (mo_dir / "modelopt.json").exists():
            proc = subprocess.run(
                [mo_python, __file__, "--worker", str(base), str(mo_dir), method],
                capture_output=True,
                text=True,
            )
            if proc.returncode:
                raise SystemExit(f"ModelOpt worker failed for {family}/{method}:\n{proc.stderr[-4000:]}")
        ours = lower_ours(base, method, work / family / f"ours-{method}")
        case = {"layout": {}, "read": read_check(base, mo_dir, method)}
        for name in LAYOUTS:
            ref = layout(mo_dir / name)
            if isinstance(ours[name], str):
                case["layout"][name] = ours[name]
                continue
            # SmoothQuant: ModelOpt writes the static per-tensor W8A8_SQ_PER_CHANNEL, ours is the per-token plugin
            # layout; compared through the documented tensor-by-tensor mapping (trt/layout.py)
            mapped = modelopt_sq_as_ours(ref) if method == "smoothquant" else ref
            case["layout"][name] = compare_layouts(layout(ours[name]), mapped)
            if write_golden:
                meta = json.loads((mo_dir / "modelopt.json").read_text())
                GOLDEN.mkdir(parents=True, exist_ok=True)
                golden = {
                    "source": f"nvidia-modelopt {meta['version']} ({meta['config']})",
                    "model": MODELS[family],
                    "method": method,
                    "group_size": meta["group_size"],
                    "layout": name,
                    "options": LAYOUTS[name],
                    **ref,
                }
                (GOLDEN / f"{family}_{method}_{name}.json").write_text(json.dumps(golden, indent=1) + "\n")
        results[f"{family}/{method}"] = case
    return results


def markdown(results: dict) -> str:
    lines = [
        "| model / method | layout | tensors (names, dtypes, shapes) | config | our reader on ModelOpt's files |",
        "|---|---|---|---|---|",
    ]
    for case, r in results.items():
        for name, d in r["layout"].items():
            if isinstance(d, str):
                tens, conf = d, "-"
            else:
                bad = d["tensor_files"] + d["missing"] + d["extra"] + d["dtype_or_shape"]
                tens = "identical" if not bad else "; ".join(bad[:4])
                conf_bad = (
                    [f"missing {k}" for k in d["config_missing"]]
                    + [f"extra {k}" for k in d["config_extra"]]
                    + d["config_values"]
                )
                conf = "identical" if not conf_bad else "; ".join(conf_bad)
            rd = r["read"].get(name)
            read = rd if isinstance(rd, str) else _read_cell(rd)
            lines.append(f"| {case} | {name} | {tens} | {conf} | {read} |")
    return "\n".join(lines)


def _read_cell(rd: dict) -> str:
    same = (
        "identical"
        if not rd["elements_differing"]
        else (
            f"{rd['elements_differing']}/{rd['elements']} elements differ"
            + (
                " by one step (x.5 ties)"
                if rd["all_differences_one_step"]
                else f", max {rd['max_abs_weight_diff']:.1e}"
            )
        )
    )
    logits = rd.get("max_abs_logit_diff_vs_modelopt_fake_quant")
    if logits is None:
        return f"weights {same}"
    return (
        f"weights {same}; logits max diff {logits:.1e} "
        f"({rd['same_with_modelopt_fake_quant_weights']:.1e} with ModelOpt's tie values)"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modelopt-python", default="/tmp/mo/bin/python")
    p.add_argument("--work", type=Path, default=None)
    p.add_argument("--write-golden", action="store_true")
    p.add_argument("--only", nargs="*", help="cases to run, e.g. llama/awq (default: all)")
    p.add_argument("--worker", nargs=3, metavar=("BASE", "OUT", "METHOD"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        worker(*a.worker)
        return
    work = a.work or Path(tempfile.mkdtemp(prefix="trtllm-vs-modelopt-"))
    results = run(a.modelopt_python, work, a.write_golden, a.only)
    (work / "results.json").write_text(json.dumps(results, indent=1))
    print(markdown(results))
    print(f"\nfull results: {work / 'results.json'}")


if __name__ == "__main__":
    main()
