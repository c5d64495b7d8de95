"""Peer quantizers for bench/quant_accuracy.py, run INSIDE the peer's own venv (their pins differ from ours).

    PYTHON quant_peers.py NAME MERGED_DIR CALIB_IDS.pt EVAL_IDS.pt REF.f32 OUT.pt --bits 4 --group-size 16 --symmetric 0

NAME is LIBRARY-METHOD[-VARIANT] (see PEERS). Every peer gets exactly our calibration ids and the bits, group size
and symmetry that quant_accuracy.py resolved for our own run of that method (--symmetric; nncf-rtn-sym is
nncf-rtn run symmetric); each keeps its library's other defaults (noted per function).
Writes {"tokens", "wall_s", "cpu_s"}: the per-token statistics of the quantized model on the eval ids against the
reference REF.f32 (bench/quant_metrics.py; float32 activations unless noted); wall_s / cpu_s of the quantization
call only (not loading or saving). Imports only torch, numpy, transformers, the peer library and quant_metrics.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.quant_metrics import open_reference, stream_tokens  # noqa: E402


def elapsed(t0: tuple[float, float]) -> tuple[float, float]:
    return time.perf_counter() - t0[0], time.process_time() - t0[1]


def now() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


# ------------------------------------------------------------------------------ llm-compressor 0.14.0.1


def _llmc_run(merged: str, calib: torch.Tensor, recipe):
    import transformers
    from datasets import Dataset
    from llmcompressor import oneshot

    model = transformers.AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    ds = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
    t0 = now()
    oneshot(
        model=model,
        dataset=ds,
        recipe=recipe,
        max_seq_length=calib.shape[1],
        num_calibration_samples=calib.shape[0],
    )
    return model.eval(), elapsed(t0)  # in-memory fake-quant model (weights quantize-dequantized in forward)


def _llmc_groups(bits: int, group_size: int, symmetric: bool) -> dict:
    return {
        "group_0": {
            "targets": ["Linear"],
            "weights": {
                "num_bits": bits,
                "type": "int",
                "symmetric": symmetric,
                "strategy": "group",
                "group_size": group_size,
            },
        }
    }


# llm-compressor refuses a layer whose columns are not a multiple of the group (the fixture's down_proj: 1376 at
# g128) unless told its runtime handles a ragged last group; the fake-quant model we score does.
_LLMC_RAGGED = {"bypass_divisibility_checks": True}


def llmcompressor_gptq(merged: str, calib: torch.Tensor, bits: int, group_size: int, symmetric: bool):
    """GPTQModifier: no act-order, dampening 0.01, block 128 (ours: the same)."""
    from llmcompressor.modifiers.quantization import GPTQModifier

    groups = _llmc_groups(bits, group_size, symmetric)
    groups["group_0"]["weights"]["actorder"] = None
    return _llmc_run(
        merged,
        calib,
        GPTQModifier(
            config_groups=groups, ignore=["lm_head"], **_LLMC_RAGGED, dampening_frac=0.01, block_size=128
        ),
    )


def llmcompressor_awq(merged: str, calib: torch.Tensor, bits: int, group_size: int, symmetric: bool):
    """AWQModifier (duo scaling, 20-point grid: its defaults, ours too) then QuantizationModifier (min-max RTN).

    llm-compressor's AWQ has no clipping search. Its default mappings skip v_proj → o_proj on GQA models (shapes).
    """
    import llmcompressor.pipelines.cache as cache
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier

    # AWQ pins its cached activations, which needs an accelerator; pinning only speeds host-to-device copies
    cache.IntermediatesCache.pin_memory = lambda self, *a, **k: None
    recipe = [
        AWQModifier(duo_scaling=True, n_grid=20),
        QuantizationModifier(
            config_groups=_llmc_groups(bits, group_size, symmetric), ignore=["lm_head"], **_LLMC_RAGGED
        ),
    ]
    return _llmc_run(merged, calib, recipe)


def llmcompressor_awq_gptq(merged: str, calib: torch.Tensor, bits: int, group_size: int, symmetric: bool):
    """AWQModifier (smoothing only) then GPTQModifier on the smoothed weights: llm-compressor's AWQ + GPTQ recipe,
    the peer of our awq-gptq. Settings as llmcompressor_awq and llmcompressor_gptq."""
    import llmcompressor.pipelines.cache as cache
    from llmcompressor.modifiers.quantization import GPTQModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier

    cache.IntermediatesCache.pin_memory = lambda self, *a, **k: None  # see llmcompressor_awq
    groups = _llmc_groups(bits, group_size, symmetric)
    groups["group_0"]["weights"]["actorder"] = None
    recipe = [
        AWQModifier(duo_scaling=True, n_grid=20),
        GPTQModifier(
            config_groups=groups, ignore=["lm_head"], **_LLMC_RAGGED, dampening_frac=0.01, block_size=128
        ),
    ]
    return _llmc_run(merged, calib, recipe)


# ------------------------------------------------------------------------------------------- GPTQModel 7.6.0


def _gptqmodel_run(merged: str, calib: torch.Tensor, qc, dtype: torch.dtype, backend):
    from gptqmodel import GPTQModel

    model = GPTQModel.load(merged, qc, dtype=dtype)
    data = [{"input_ids": row[None], "attention_mask": torch.ones_like(row)[None]} for row in calib]
    t0 = now()
    model.quantize(data, batch_size=1, backend=backend)
    wall = elapsed(t0)
    saved = tempfile.mkdtemp(prefix="gptqmodel-")  # the in-memory model after quantize() gives garbage logits
    model.save(saved)
    return GPTQModel.load(saved, backend=backend).model.eval(), wall


def gptqmodel_gptq(merged: str, calib: torch.Tensor, bits: int, group_size: int, symmetric: bool):
    """desc_act off, damp 0.01; logits from the saved checkpoint through BACKEND.TORCH (computes in float16)."""
    from gptqmodel import BACKEND, QuantizeConfig

    qc = QuantizeConfig(bits=bits, group_size=group_size, desc_act=False, sym=symmetric, damp_percent=0.01)
    return _gptqmodel_run(merged, calib, qc, torch.float32, BACKEND.TORCH)


def gptqmodel_awq(merged: str, calib: torch.Tensor, bits: int, group_size: int, symmetric: bool):
    """AWQConfig (GEMM): duo scaling, 20-point grid, clipping search (not q/k): AutoAWQ's algorithm.

    Runs in float16: its CPU AWQ kernel (AwqTorchLinear, BACKEND.AWQ_TORCH) refuses a float32 model at packing.
    Its clip search asserts out_features % 64 == 0 (the demo's gate/up have 688 rows); it is independent per
    output row, so we pad the rows with copies of the last one and drop the padding's result: same algorithm.
    """
    from gptqmodel import BACKEND
    from gptqmodel.looper.awq_processor import AWQProcessor
    from gptqmodel.quantization.config import AWQConfig

    search = AWQProcessor._compute_best_clip

    def padded_clip(self, w, input_feat, *args, **kwargs):
        rows = w.shape[0]
        pad = -rows % 64
        if pad:
            w = torch.cat([w, w[-1:].expand(pad, -1)])
        return search(self, w, input_feat, *args, **kwargs)[:rows]

    AWQProcessor._compute_best_clip = padded_clip
    qc = AWQConfig(bits=bits, group_size=group_size, sym=symmetric)
    return _gptqmodel_run(merged, calib, qc, torch.float16, BACKEND.AWQ_TORCH)


# ---------------------------------------------------------------------------------------------- NNCF 3.4.0


def _nncf_run(merged: str, calib: torch.Tensor, bits: int, group_size: int, symmetric: bool, **algos):
    """nncf.compress_weights on the torch model: every decoder linear 4-bit (ratio 1), embeddings and lm_head
    left in float (backup_mode NONE), as ours. The torch backend needs a dataset even when data-free (tracing)."""
    import nncf
    import transformers

    if bits != 4:
        raise SystemExit("NNCF peers: only 4-bit (INT4_SYM / INT4_ASYM) is wired here")
    model = transformers.AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    ds = nncf.Dataset(
        [{"input_ids": row[None], "attention_mask": torch.ones_like(row)[None]} for row in calib]
    )
    mode = nncf.CompressWeightsMode.INT4_SYM if symmetric else nncf.CompressWeightsMode.INT4_ASYM
    t0 = now()
    model = nncf.compress_weights(
        model,
        mode=mode,
        group_size=group_size,
        ratio=1.0,
        backup_mode=nncf.BackupMode.NONE,
        dataset=ds,
        subset_size=len(calib),
        **algos,
    )
    return model.eval(), elapsed(t0)


def nncf_rtn(merged: str, calib: torch.Tensor, bits: int, group_size: int, symmetric: bool):
    """Data-free min-max (NNCF's default weight compression)."""
    return _nncf_run(merged, calib, bits, group_size, symmetric)


def nncf_awq(merged: str, calib: torch.Tensor, bits: int, group_size: int, symmetric: bool):
    """awq=True, its defaults (AdvancedAWQParameters: 32 samples, 100-step alpha grid). NNCF's AWQ smooths only
    the MatMul → Multiply → MatMul pattern (up_proj · act(gate) → down_proj) and activation → MatMul; the
    norm → q/k/v and norm → gate/up scales of AutoAWQ are not searched."""
    return _nncf_run(merged, calib, bits, group_size, symmetric, awq=True)


def nncf_awq_se(merged: str, calib: torch.Tensor, bits: int, group_size: int, symmetric: bool):
    """awq=True + scale_estimation=True (NNCF's recommended data-aware INT4 recipe; scale estimation refits each
    group's scale to minimise the layer's output error, the role AWQ's clipping search plays elsewhere)."""
    return _nncf_run(merged, calib, bits, group_size, symmetric, awq=True, scale_estimation=True)


class _OpenVINOLogits:
    """A compiled OpenVINO model called like a transformers model: .logits of float32 inference."""

    def __init__(self, ov_model):
        import openvino as ov

        self.compiled = ov.Core().compile_model(ov_model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})

    def __call__(self, input_ids: torch.Tensor):  # [b, seq], run row by row: the IR was traced with batch 1
        rows = [self.compiled((r[None].numpy(), torch.ones_like(r[None]).numpy()))[0] for r in input_ids]
        return type("Output", (), {"logits": torch.from_numpy(np.concatenate(rows))})

    def eval(self):
        return self


def nncf_gptq(merged: str, calib: torch.Tensor, bits: int, group_size: int, symmetric: bool):
    """gptq=True exists only on NNCF's OpenVINO backend (the torch backend refuses it), so: the transformers
    model traced by openvino.convert_model (float logits equal torch's to ~1e-5 on the demo), compressed there,
    logits from the OpenVINO CPU plugin in f32. damp 0.01 and block 128 as ours (NNCF's default damp is 0.1);
    NNCF's GPTQ has no act-order. The conversion is not timed."""
    import nncf
    import openvino as ov
    import transformers

    class Logits(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask):  # explicit mask: the maskless path traces aten::diff
            return self.m(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    model = transformers.AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    example = (calib[:1], torch.ones_like(calib[:1]))
    with torch.no_grad():
        ov_model = ov.convert_model(
            Logits(model), example_input=example, input=[ov.PartialShape([1, -1])] * 2
        )
    ds = nncf.Dataset([(row[None].numpy(), torch.ones_like(row)[None].numpy()) for row in calib])
    mode = nncf.CompressWeightsMode.INT4_SYM if symmetric else nncf.CompressWeightsMode.INT4_ASYM
    params = nncf.AdvancedCompressionParameters(
        gptq_params=nncf.AdvancedGPTQParameters(damp_percent=0.01, block_size=128, subset_size=len(calib))
    )
    t0 = now()
    ov_model = nncf.compress_weights(
        ov_model,
        mode=mode,
        group_size=group_size,
        ratio=1.0,
        backup_mode=nncf.BackupMode.NONE,
        dataset=ds,
        subset_size=len(calib),
        gptq=True,
        advanced_parameters=params,
    )
    return _OpenVINOLogits(ov_model), elapsed(t0)


# ---------------------------------------------------------------------------------------- ModelOpt 0.47.0


def modelopt_awq(merged: str, calib: torch.Tensor, bits: int, group_size: int, symmetric: bool):
    """mtq.INT4_AWQ_CFG (awq_lite, alpha step 0.1: its defaults) with our group size; logits from its
    fake-quant model in float32. ModelOpt's INT4 AWQ is symmetric only (no zero point): asymmetric is refused."""
    import copy

    import modelopt.torch.quantization as mtq
    import transformers

    if bits != 4 or not symmetric:
        raise SystemExit("modelopt-awq: INT4_AWQ is 4-bit symmetric only; run it with --symmetric 1")
    cfg = copy.deepcopy(mtq.INT4_AWQ_CFG)
    for entry in cfg["quant_cfg"]:
        if entry.get("quantizer_name") == "*weight_quantizer":
            entry["cfg"]["block_sizes"][-1] = group_size
    model = transformers.AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()

    def forward_loop(m):
        for row in calib:
            m(input_ids=row[None])

    t0 = now()
    model = mtq.quantize(model, cfg, forward_loop)
    return model.eval(), elapsed(t0)


def padded_mlp(merged: str, group_size: int) -> str:
    """The merged checkpoint with its MLP width padded up to a multiple of group_size, for peers that refuse (or
    crash on) a ragged last group: extra gate/up rows and down_proj columns of zeros (silu(0) · 0 = 0, so the
    logits are the same). Their zero inputs leave every peer's quantization of the real columns as it would be
    with a ragged group (the range already includes 0; GPTQ zeroes dead columns). Written once next to MERGED."""
    import json

    import transformers

    cfg = json.loads((Path(merged) / "config.json").read_text())
    pad = -cfg["intermediate_size"] % group_size
    if group_size <= 0 or pad == 0:
        return merged
    out = Path(f"{merged}-pad{group_size}")
    if (out / "config.json").exists():
        return str(out)
    model = transformers.AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    for layer in model.model.layers:
        mlp = layer.mlp
        for lin in (mlp.gate_proj, mlp.up_proj):
            lin.weight.data = torch.cat([lin.weight.data, lin.weight.new_zeros(pad, lin.weight.shape[1])])
            lin.out_features += pad
        w = mlp.down_proj.weight.data
        mlp.down_proj.weight.data = torch.cat([w, w.new_zeros(w.shape[0], pad)], dim=1)
        mlp.down_proj.in_features += pad
    model.config.intermediate_size += pad
    tmp = Path(tempfile.mkdtemp(prefix=out.name + "-", dir=out.parent))
    model.to(getattr(torch, cfg.get("dtype") or cfg.get("torch_dtype") or "float32")).save_pretrained(tmp)
    transformers.AutoTokenizer.from_pretrained(merged).save_pretrained(tmp)
    try:
        tmp.rename(out)  # another peer process may have written it first: theirs is the same
    except OSError:
        pass
    return str(out)


PEERS = {
    "llmcompressor-gptq": llmcompressor_gptq,
    "llmcompressor-awq": llmcompressor_awq,
    "llmcompressor-awq-gptq": llmcompressor_awq_gptq,
    "modelopt-awq": modelopt_awq,
    "gptqmodel-gptq": gptqmodel_gptq,
    "gptqmodel-awq": gptqmodel_awq,
    "nncf-rtn": nncf_rtn,
    "nncf-rtn-sym": nncf_rtn,
    "nncf-gptq": nncf_gptq,
    "nncf-awq": nncf_awq,
    "nncf-awq-se": nncf_awq_se,
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("name", choices=sorted(PEERS))
    ap.add_argument("merged")
    ap.add_argument("calib")
    ap.add_argument("eval")
    ap.add_argument("ref")
    ap.add_argument("out")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--symmetric", type=int, choices=[0, 1], required=True)
    ap.add_argument("--eval-stride", type=int, default=1, help="score every k-th eval block only")
    a = ap.parse_args()
    torch.manual_seed(0)
    merged = padded_mlp(a.merged, a.group_size)
    model, wall = PEERS[a.name](merged, torch.load(a.calib), a.bits, a.group_size, bool(a.symmetric))
    ids = torch.load(a.eval)
    ref = open_reference(Path(a.ref), ids)[:: a.eval_stride]
    tokens = stream_tokens(lambda b: model(input_ids=b).logits, ids[:: a.eval_stride], ref)
    torch.save({"tokens": tokens, "wall_s": wall[0], "cpu_s": wall[1]}, a.out)
    print(f"{a.name}: quantized in {wall[0]:.1f}s wall, {wall[1]:.1f}s cpu", flush=True)


if __name__ == "__main__":
    main()
