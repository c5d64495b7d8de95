"""Do transformers (with each format's loader package) load our quantized HF checkpoints and reproduce our codes?

Two steps, because the loaders' pins differ from ours (bench/QUANT_FORMATS.md has the venvs and pins):

    # 1. in the project venv: tiny llama + qwen2 (qkv bias) models, every method, written in every format
    .venv/bin/python bench/check_hf_formats.py make /tmp/hf-formats
    # 2. in a loader venv: load each checkpoint it can, compare with what step 1 saved
    /tmp/ct-venv/bin/python bench/check_hf_formats.py load /tmp/hf-formats --loader compressed-tensors
    GPTQMODEL_CPU_WORKERS=2 /tmp/gptq-venv/bin/python bench/check_hf_formats.py load /tmp/hf-formats --loader gptqmodel

Per checkpoint, `load` prints:
- weights: the effective weight of every quantized linear as the loaded module computes it (probed with an
  identity input, bias removed) against our dequantize(QTensor): max |diff|, and whether it is bit-exact
  in float32 or after rounding to the kernel's float16;
- logits: max |diff| between transformers' logits and our fake-quant decoder's on held-out ids, next to the
  yardstick of float16 compute: our own fake-quant decoder run in float16 vs float32. For W8A8 also against our
  decoder with compressed-tensors' activation rounding swapped in (absmax/127.5 where ours and vLLM's use
  absmax/127; compressed-tensors cannot express ours, see lorafast_export/quant/formats/compressed_tensors.py).
Step 2 imports only torch and transformers (plus the loader), never lorafast_export.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

# (name, family, method, hf_format, extra quant settings)
CASES = [
    ("llama-rtn-asym-ct", "llama", "rtn", "compressed-tensors", {"group_size": 32}),
    ("qwen2-rtn-sym-ct", "qwen2", "rtn", "compressed-tensors", {"group_size": 32, "symmetric": True}),
    ("qwen2-int8-ct", "qwen2", "int8", "compressed-tensors", {}),
    ("llama-smoothquant-ct", "llama", "smoothquant", "compressed-tensors", {}),
    ("qwen2-gptq-ct", "qwen2", "gptq", "compressed-tensors", {"group_size": 32}),
    ("llama-gptq-gptq", "llama", "gptq", "gptq", {"group_size": 32}),
    ("qwen2-gptq-gptq-actorder", "qwen2", "gptq", "gptq", {"group_size": 32, "act_order": True}),
    ("llama-gptq-gptq-asym", "llama", "gptq", "gptq", {"group_size": 32, "symmetric": False}),
    ("llama-awq-awq", "llama", "awq", "awq", {"group_size": 32}),
    ("qwen2-awq-awq", "qwen2", "awq", "awq", {"group_size": 32}),
]
LOADER_FORMATS = {"compressed-tensors": ("compressed-tensors",), "gptqmodel": ("gptq", "awq")}


# ------------------------------------------------------------------------------------------ step 1: make


def make(out: Path) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import lorafast_export.qform as qform
    from lorafast_export.model.quantized import fake_quant_decoder
    from lorafast_export.quant.export_hf import write_quantized_checkpoint
    from lorafast_export.quant.formats import ct_fake_quant_int8_per_token
    from lorafast_export.quant.walk import quantize_checkpoint
    from lorafast_export.testing import make_model, save_model

    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    calib = torch.randint(0, 128, (16, 32), generator=g)
    held = torch.randint(0, 128, (2, 24), generator=g)
    for fam in ("llama", "qwen2"):
        save_model(
            make_model(
                fam, hidden=64, heads=4, kv_heads=4 if fam == "llama" else 2, intermediate_size=128, vocab=128
            ),
            out / f"merged-{fam}",
        )
    for name, fam, method, fmt, extra in CASES:
        qm = quantize_checkpoint(out / f"merged-{fam}", {"method": method, **extra}, calib_ids=calib)
        recipe = SimpleNamespace(target=SimpleNamespace(hf_format=fmt))
        write_quantized_checkpoint(
            SimpleNamespace(merged_dir=out / f"merged-{fam}", recipe=recipe, quantized=qm), out / name
        )
        dec = fake_quant_decoder(qm)
        with torch.no_grad():
            logits = dec(held)[0]
            logits_fp16 = fake_quant_decoder(qm, dtype=torch.float16)(held)[0].float()  # yardstick
            orig, qform.fake_quant_int8_per_token = (
                qform.fake_quant_int8_per_token,
                ct_fake_quant_int8_per_token,
            )
            try:
                logits_ct = dec(held)[0]
            finally:
                qform.fake_quant_int8_per_token = orig
        torch.save(
            {
                "held": held,
                "logits": logits,
                "logits_ct_act": logits_ct,
                "logits_fp16": logits_fp16,
                "weights": {k: qform.dequantize(qt) for k, qt in qm.q.items()},
                "act_quant": qm.settings["method"] == "smoothquant",
                "format": fmt,
            },
            out / name / "expected.pt",
        )
        print(f"wrote {name}")


# ------------------------------------------------------------------------------------------ step 2: load


def load_model(path: Path, fmt: str):
    import transformers

    kw = {}
    if fmt == "gptq":  # the default CPU kernel (TorchAten) rounds scales to bfloat16; "torch" keeps float16
        kw["quantization_config"] = transformers.GPTQConfig(bits=4, backend="torch")
    elif fmt == "awq":
        kw["quantization_config"] = transformers.AwqConfig(bits=4, backend="torch_awq")
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw).eval()
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 2, 3]]))  # compressed-tensors decompresses on the first forward
    return model


@torch.no_grad()
def probe_weight(module) -> torch.Tensor:
    """The [out, in] weight the module applies: its class forward on I with the bias removed.

    compressed-tensors decompresses into plain nn.Linear modules: their weight is what they apply.
    """
    if type(module) is torch.nn.Linear:
        return module.weight.detach().float()
    bias, module.bias = module.bias, None
    try:
        return type(module).forward(module, torch.eye(module.in_features)).float().T
    finally:
        module.bias = bias


def check(path: Path) -> dict:
    exp = torch.load(path / "expected.pt")
    model = load_model(path, exp["format"])
    with torch.no_grad():
        logits = model(input_ids=exp["held"]).logits.float()
    worst, exact32, exact16 = 0.0, True, True
    kind = None
    for name, w in exp["weights"].items():
        module = model.get_submodule(name)
        kind = type(module).__name__
        got = probe_weight(module)
        worst = max(worst, float((got - w).abs().max()))
        exact32 &= torch.equal(got, w)
        exact16 &= torch.equal(got.half(), w.half())
    return {
        "checkpoint": path.name,
        "module": kind,
        "weights_max_abs_diff": worst,
        "weights_bit_exact_fp32": exact32,
        "weights_bit_exact_fp16": exact16,
        "logits_max_abs_diff": float((logits - exp["logits"]).abs().max()),
        "logits_scale": float(exp["logits"].abs().max()),
        "ours_fp16_vs_fp32": float((exp["logits_fp16"] - exp["logits"]).abs().max()),
        "logits_max_abs_diff_ct_act_rounding": float((logits - exp["logits_ct_act"]).abs().max())
        if exp["act_quant"]
        else None,
    }


def load(out: Path, loader: str) -> None:
    rows = []
    for name, _fam, _m, fmt, _e in CASES:
        if fmt in LOADER_FORMATS[loader] and (out / name / "expected.pt").exists():
            try:
                rows.append(check(out / name))
            except Exception as e:  # noqa: BLE001 - a benchmark: record the failure and go on to the next
                rows.append({"checkpoint": name, "error": f"{type(e).__name__}: {e}"[:300]})
            print(json.dumps(rows[-1]))
    print(
        "| checkpoint | module | weights max abs diff | bit-exact fp32 / fp16 | logits max abs diff (scale) "
        "| ours fp16 vs fp32 | W8A8: logits vs ours with CT's activation rounding |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['checkpoint']} | ERROR | {r['error']} | | | | |")
            continue
        ct = r["logits_max_abs_diff_ct_act_rounding"]
        print(
            f"| {r['checkpoint']} | {r['module']} | {r['weights_max_abs_diff']:.2e} | "
            f"{r['weights_bit_exact_fp32']} / {r['weights_bit_exact_fp16']} | "
            f"{r['logits_max_abs_diff']:.2e} ({r['logits_scale']:.1f}) | {r['ours_fp16_vs_fp32']:.2e} | "
            f"{'' if ct is None else f'{ct:.2e}'} |"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("step", choices=["make", "load"])
    ap.add_argument("out", type=Path)
    ap.add_argument("--loader", choices=sorted(LOADER_FORMATS), default="compressed-tensors")
    a = ap.parse_args()
    torch.set_num_threads(2)
    make(a.out) if a.step == "make" else load(a.out, a.loader)


if __name__ == "__main__":
    main()
