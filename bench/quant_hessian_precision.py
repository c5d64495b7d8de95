"""Does GPTQ's float32 Hessian accumulation cost accuracy? One layer of a real model, its real calibration inputs.

    .venv/bin/python bench/quant_hessian_precision.py --out /tmp/q30 --layer 3

OUT is a bench/quant_accuracy.py output directory (merged checkpoint, calib_ids.pt). The walk (smoothquant, so the
layer's inputs are those of a quantized model) hands over the activations entering LAYER; the q/k/v input (after
input_layernorm) gives H accumulated in float32 (ours, chunk by chunk as the walk does) and in float64 (one
matmul). GPTQ then runs on q/k/v with each H (and with H in float64 solved in float64), and we compare codes and
the output error ||X W^T - X Q^T||^2 / ||X W^T||^2 on the same X.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lorafast_export.qform import dequantize  # noqa: E402
from lorafast_export.quant.gptq import accumulate_hessian, gptq_quantize_many  # noqa: E402
from lorafast_export.quant.walk import quantize_checkpoint  # noqa: E402
from lorafast_export.weights import open_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--layer", type=int, default=3)
    ap.add_argument("--symmetric", type=int, default=0)
    a = ap.parse_args()
    calib = torch.load(a.out / "calib_ids.pt")
    seen: dict[str, torch.Tensor] = {}
    quantize_checkpoint(
        a.out / "merged",
        {"method": "smoothquant", "device": "cpu"},
        calib_ids=calib,
        observe=lambda i, x: seen.setdefault("x", x.detach().clone()) if i == a.layer else None,
    )
    md = open_model(a.out / "merged")
    get = lambda n: md.store.get(f"model.layers.{a.layer}.{n}").float()  # noqa: E731
    h = seen["x"].float().reshape(-1, seen["x"].shape[-1])  # [tokens, hidden]
    x = (
        h
        * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + md.config.rms_norm_eps)
        * get("input_layernorm.weight")
    )
    H32, n = None, 0
    for chunk in x.split(256 * 4):  # as the walk: a few samples at a time
        H32, n = accumulate_hessian(H32, n, chunk)
    H64 = (2.0 / x.shape[0]) * x.double().T @ x.double()
    print(
        f"layer {a.layer}: tokens {x.shape[0]}, max |H32 - H64| / max |H64| = {float((H32.double() - H64).abs().max() / H64.abs().max()):.2e}"
    )
    ws = [get(f"self_attn.{p}_proj.weight") for p in "qkv"]
    ref = x.double() @ torch.cat(ws).double().T
    codes = {}
    for name, H in (("float32 H (ours)", H32), ("float64 H", H64.float())):
        qts = gptq_quantize_many(ws, H, 4, 128, bool(a.symmetric))
        codes[name] = torch.cat([q.codes for q in qts])
        w_hat = torch.cat([dequantize(q) for q in qts]).double()
        err = float((x.double() @ w_hat.T - ref).pow(2).sum() / ref.pow(2).sum())
        print(f"| {name} | relative output error {err:.6e} |")
    a_, b_ = codes.values()
    print(f"codes that differ: {int((a_ != b_).sum())} of {a_.numel()}")


if __name__ == "__main__":
    main()
