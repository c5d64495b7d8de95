"""Which symmetric grid: KL of symmetric RTN and GPTQ under each candidate scale rule, same model, same tokens.

    .venv/bin/python bench/quant_grid.py --out /tmp/qgrid                          # demo:base + demo:lora
    .venv/bin/python bench/quant_grid.py --base DIR --adapter none --out /tmp/qgrid --group-sizes 128 64 32

Candidates for the per-group symmetric scale (b bits, h = 2**(b-1); 4 bits: h = 8):
- absmax/(h-1): codes -7..7, the 16th level unused (the grid before issue 14);
- absmax/(h-0.5): GPTQ's / llm-compressor's 2·absmax/15, codes -8..7, +absmax clipped by half a step;
- extreme/-h: NNCF's signed scale: the larger-magnitude endpoint, with its sign, lands exactly on -h, so all 16
  levels are used and nothing on that side is clipped (the scale is negative when the extreme is positive).
Each candidate replaces lorafast_export.quant.rtn.symmetric_scale (which RTN and GPTQ both call) for its rows;
extreme/-8 is that function itself (the shipped grid).
The reference is the base with its adapter UNMERGED (transformers + PEFT, fp32), or the base alone with
--adapter none. Calibration: samples x seq_len ids from the bundled calib.txt, seed 0.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.quant_accuracy import cached_reference, merged_calib_eval  # noqa: E402
from bench.quant_metrics import open_reference, stream_tokens, summary, write_reference  # noqa: E402
from lorafast_export.adapters import open_adapter  # noqa: E402
from lorafast_export.model.quantized import fake_quant_decoder  # noqa: E402
from lorafast_export.paths import DEMO_DIR, TEXT_DIR  # noqa: E402
from lorafast_export.quant import rtn  # noqa: E402
from lorafast_export.quant.walk import quantize_checkpoint  # noqa: E402


def _finish(scale: torch.Tensor, scale_dtype: torch.dtype) -> torch.Tensor:
    """Round the magnitude up to scale_dtype (never clips), keep the sign, never 0."""
    tiny = torch.finfo(scale_dtype).tiny
    sign = torch.where(scale < 0, -1.0, 1.0)
    return (rtn.round_up_to_dtype(scale.abs().clamp(min=tiny), scale_dtype).float() * sign).to(scale_dtype)


def absmax_over(levels: float):
    def scale(wmin, wmax, bits, scale_dtype):
        absmax = torch.maximum(wmin.abs(), wmax.abs()).float()
        return _finish(absmax / levels(bits), scale_dtype)

    return scale


GRIDS = {
    "absmax/7": absmax_over(lambda b: 2 ** (b - 1) - 1),
    "absmax/7.5": absmax_over(lambda b: 2 ** (b - 1) - 0.5),
    "extreme/-8": rtn.symmetric_scale,  # what quant/rtn.py ships
}


def _cell(r: dict, best: float) -> str:
    mark = "**" if r["kl_mean"] == best else ""
    return f"{mark}{r['kl_mean']:.5f}{mark} ({r['kl_p99']:.4f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", type=Path, default=DEMO_DIR / "base")
    ap.add_argument("--adapter", default=str(DEMO_DIR / "lora"), help="adapter dir, or 'none'")
    ap.add_argument("--text-dir", type=Path, default=TEXT_DIR)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--grids", nargs="+", default=list(GRIDS))
    ap.add_argument("--methods", nargs="+", default=["rtn", "gptq"])
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-sizes", type=int, nargs="+", default=[128, 64, 32])
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--eval-blocks", type=int, default=16)
    ap.add_argument("--block", type=int, default=256)
    a = ap.parse_args()
    torch.manual_seed(0)
    a.out.mkdir(parents=True, exist_ok=True)

    adapters = [] if a.adapter == "none" else [open_adapter(a.adapter)]
    merged, calib, ids = merged_calib_eval(a, adapters)
    if adapters:
        ref, _ = cached_reference(a.out, a.base, Path(a.adapter), ids)
    else:
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(a.base, dtype=torch.float32).eval()
        with torch.no_grad():
            write_reference(a.out / "ref_base.f32", (model(input_ids=b[None]).logits[0] for b in ids))
        ref = open_reference(a.out / "ref_base.f32", ids)
    original = rtn.symmetric_scale
    rows = []
    for gs in a.group_sizes:
        for method in a.methods:
            for grid in a.grids:
                rtn.symmetric_scale = GRIDS[grid]
                try:
                    settings = {
                        "method": method,
                        "bits": a.bits,
                        "group_size": gs,
                        "symmetric": True,
                        "device": "cpu",
                    }
                    t0 = time.perf_counter()
                    qm = quantize_checkpoint(merged, settings, calib_ids=calib)
                    wall = time.perf_counter() - t0
                    dec = fake_quant_decoder(qm)
                    m = summary(stream_tokens(lambda b, dec=dec: dec(b)[0], ids, ref))
                finally:
                    rtn.symmetric_scale = original
                rows.append({"group_size": gs, "method": method, "grid": grid, "wall_s": wall, **m})
                print(json.dumps(rows[-1]), flush=True)
    (a.out / "grid.json").write_text(json.dumps(rows, indent=2))
    print(f"\ncalib {tuple(calib.shape)}, eval {tuple(ids.shape)}, {a.bits}-bit symmetric; KL mean (p99)\n")
    print("| group | method | " + " | ".join(a.grids) + " |\n|---|---|" + "---|" * len(a.grids))
    for gs in a.group_sizes:
        for method in a.methods:
            cells = {r["grid"]: r for r in rows if r["group_size"] == gs and r["method"] == method}
            best = min(c["kl_mean"] for c in cells.values())
            print(f"| g{gs} | {method} | " + " | ".join(_cell(cells[g], best) for g in a.grids) + " |")


if __name__ == "__main__":
    main()
