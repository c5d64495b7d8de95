"""Ragged MLP width in the hf checkpoints, at full size: the 30M fixture (MLP 1376) at g128, RTN.

    .venv/bin/python bench/quant_ragged.py --out /tmp/q30

OUT is a bench/quant_accuracy.py output directory (its merged checkpoint and eval ids). Writes compressed-tensors and
AWQ checkpoints (each pads the MLP to whole groups), reads them back with our reader, and compares codes, scales
and logits on two eval blocks with the quantized stage (fake-quant); compressed-tensors also through transformers.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lorafast_export.model.quantized import fake_quant_decoder  # noqa: E402
from lorafast_export.qform import dequantize  # noqa: E402
from lorafast_export.quant.export_hf import write_quantized_checkpoint  # noqa: E402
from lorafast_export.quant.read_hf import read_quantized_checkpoint  # noqa: E402
from lorafast_export.quant.walk import quantize_checkpoint  # noqa: E402
from lorafast_export.targets.registry import LowerInput  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--group-size", type=int, default=128)
    a = ap.parse_args()
    merged = a.out / "merged"
    qm = quantize_checkpoint(merged, {"method": "rtn", "group_size": a.group_size, "device": "cpu"})
    ids = torch.load(a.out / "eval_ids.pt")[[0, -1]]  # one code block, one prose block
    with torch.no_grad():
        want = fake_quant_decoder(qm)(ids)[0]
    for fmt in ("compressed-tensors", "awq"):
        out = Path(tempfile.mkdtemp(prefix=f"ragged-{fmt}-"))
        recipe = SimpleNamespace(target=SimpleNamespace(hf_format=fmt))
        facts = write_quantized_checkpoint(LowerInput(merged, qm.config, recipe, qm), out)
        back = read_quantized_checkpoint(out)
        same = zero = True
        for n, qt in qm.q.items():
            o, i = qt.codes.shape
            wb = dequantize(back.q[n])
            same &= torch.equal(back.q[n].codes[:o, :i], qt.codes) and torch.equal(wb[:o, :i], dequantize(qt))
            zero &= not wb[o:].any() and not wb[:, i:].any()
        with torch.no_grad():
            diff = float((fake_quant_decoder(back)(ids)[0] - want).abs().max())
        width = json.loads((out / "config.json").read_text())["intermediate_size"]
        line = f"| {fmt} | {facts.get('intermediate_size_padded')} | {width} | {same} | {zero} | {diff:.1e} |"
        if fmt == "compressed-tensors":
            import transformers

            model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
            with torch.no_grad():
                line += f" {float((model(input_ids=ids).logits - want).abs().max()):.1e} |"
        print(line, flush=True)


if __name__ == "__main__":
    main()
