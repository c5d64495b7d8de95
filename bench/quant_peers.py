"""Peer quantizers for bench/quant_accuracy.py, run INSIDE the peer's own venv (their pins differ from ours).

    PYTHON quant_peers.py NAME MERGED_DIR CALIB_IDS.pt EVAL_IDS.pt OUT.pt --bits 4 --group-size 128

NAME: llmcompressor-gptq (llm-compressor 0.14.0.1, GPTQModifier, sym, no act-order) or gptqmodel-gptq
(GPTQModel 7.6.0, sym, desc_act off). Both see exactly our calibration ids. Writes {"logits", "wall_s", "cpu_s"}:
logits of the quantized model on the eval ids (float32 activations); wall_s / cpu_s of the quantization.
Imports only torch, transformers and the peer library.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch


def elapsed(t0: tuple[float, float]) -> tuple[float, float]:
    return time.perf_counter() - t0[0], time.process_time() - t0[1]


def llmcompressor_gptq(merged: str, calib: torch.Tensor, bits: int, group_size: int):
    import transformers
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier

    model = transformers.AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    ds = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
    config_groups = {"group_0": {"targets": ["Linear"], "weights": {
        "num_bits": bits, "type": "int", "symmetric": True, "strategy": "group", "group_size": group_size,
        "actorder": None}}}
    recipe = GPTQModifier(config_groups=config_groups, ignore=["lm_head"], dampening_frac=0.01, block_size=128)
    t0 = time.perf_counter(), time.process_time()
    oneshot(model=model, dataset=ds, recipe=recipe, max_seq_length=calib.shape[1],
            num_calibration_samples=calib.shape[0])
    return model.eval(), elapsed(t0)


def gptqmodel_gptq(merged: str, calib: torch.Tensor, bits: int, group_size: int):
    from gptqmodel import BACKEND, GPTQModel, QuantizeConfig

    qc = QuantizeConfig(bits=bits, group_size=group_size, desc_act=False, sym=True, damp_percent=0.01)
    model = GPTQModel.load(merged, qc, dtype=torch.float32)
    data = [{"input_ids": row[None], "attention_mask": torch.ones_like(row)[None]} for row in calib]
    t0 = time.perf_counter(), time.process_time()
    model.quantize(data, batch_size=1, backend=BACKEND.TORCH)
    wall = elapsed(t0)
    saved = tempfile.mkdtemp(prefix="gptqmodel-")  # the in-memory model after quantize() gives garbage logits
    model.save(saved)
    return GPTQModel.load(saved, backend=BACKEND.TORCH).model.eval(), wall


PEERS = {"llmcompressor-gptq": llmcompressor_gptq, "gptqmodel-gptq": gptqmodel_gptq}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("name", choices=sorted(PEERS))
    ap.add_argument("merged")
    ap.add_argument("calib")
    ap.add_argument("eval")
    ap.add_argument("out")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    a = ap.parse_args()
    model, wall = PEERS[a.name](a.merged, torch.load(a.calib), a.bits, a.group_size)
    ids = torch.load(a.eval)
    with torch.no_grad():
        logits = torch.cat([model(input_ids=b[None]).logits.float() for b in ids])
    torch.save({"logits": logits, "wall_s": wall[0], "cpu_s": wall[1]}, a.out)
    print(f"{a.name}: quantized in {wall[0]:.1f}s wall, {wall[1]:.1f}s cpu")


if __name__ == "__main__":
    main()
