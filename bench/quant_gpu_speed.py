"""The quantize stage on CUDA: speed on a Llama-3-8B shape against llm-compressor, and what bf16 costs.

    python bench/quant_gpu_speed.py --layers 4 --samples 128 --seq-len 2048 --peers --accuracy

Parts (each measured run is its own subprocess, so peak GPU memory is that run's alone):
- tiny: a tiny llama quantized with device=cpu and device=cuda by every calibrated method; max logit diff.
- speed: random bf16 weights of Llama-3-8B's shape (hidden 4096, MLP 14336, 32 heads / 8 KV heads, vocab
  128256; scripts/make_model.py) with --layers decoder layers (weights are seeded by tensor name, so every
  depth shares its first layers); GPTQ and AWQ at 4 bits g128 with samples x seq_len calibration ids on CUDA: seconds, seconds per
  layer, peak GPU memory. --peers: llm-compressor (GPTQModifier; AWQModifier + QuantizationModifier
  W4A16_ASYM) on the same checkpoint and ids, loaded as its examples do (dtype="auto": bf16). Per-layer
  times: ours from the walk's progress, llm-compressor's from its sequential pipeline's per-layer callback.
  --full-layers N: ours again on an N-layer model (e.g. 32: the whole model, measured, not extrapolated).
  --profile: ours with per-phase timers (forward passes, Hessians, GPTQ solve, AWQ grid and clip).
- accuracy: the bundled demo base quantized on CUDA with the walk in bf16 (default) and in float32
  (TF32 matmuls: the walk before bf16); KL / top-1 against the unquantized float32 model on held-out text.
- sweep: GPTQ's column sweep alone at 8B shapes, the Triton kernel vs the torch loop.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lorafast_export.model.quantized import fake_quant_decoder  # noqa: E402
from lorafast_export.paths import DEMO_DIR  # noqa: E402
from lorafast_export.quant.config import resolve_quant  # noqa: E402
from lorafast_export.quant.walk import quantize_checkpoint  # noqa: E402
from scripts.make_model import PRESETS, make_base, shape_of  # noqa: E402

LOG_DIR: Path | None = None  # --logs: keep each measured run's output there
OURS = {
    "gptq": {"method": "gptq"},
    "awq": {"method": "awq"},
    "awq-noclip": {"method": "awq", "awq_clip": False},
    "awq-gptq": {"method": "awq-gptq"},
    # the range search explicitly on / off, whatever the method's default (quant.range_search)
    "gptq-search": {"method": "gptq", "range_search": True},
    "gptq-nosearch": {"method": "gptq", "range_search": False},
    "gptq-sym-nosearch": {"method": "gptq", "symmetric": True, "range_search": False},  # session 6's default
    "awq-gptq-search": {"method": "awq-gptq", "range_search": True},
    "awq-gptq-nosearch": {"method": "awq-gptq", "range_search": False},
    # session 7's awq-gptq: the range search in the scale choice's trial solves too (a config-only field)
    "awq-gptq-choicesearch": {"method": "awq-gptq", "range_search": True, "choice_search": True},
}
CONFIG_ONLY = ("choice_search",)  # config fields that are not recipe options: set on the resolved config


def our_config(name: str, device: str):
    settings = {**OURS[name], "device": device}
    extra = {k: settings.pop(k) for k in CONFIG_ONLY if k in settings}
    return dataclasses.replace(resolve_quant(settings), **extra)


def tiny_cpu_vs_cuda(tmp: Path) -> dict:
    from lorafast_export.testing import make_model, save_model

    merged = save_model(
        make_model("qwen2", hidden=64, heads=4, kv_heads=2, intermediate_size=128, vocab=128), tmp / "tiny"
    )
    calib = torch.randint(0, 128, (16, 64), generator=torch.Generator().manual_seed(0))
    held = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(1))
    out = {}
    for method in ("smoothquant", "gptq", "awq"):
        logits = {}
        for device in ("cpu", "cuda"):
            qm = quantize_checkpoint(
                merged, {"method": method, "group_size": 32, "device": device}, calib_ids=calib
            )
            with torch.no_grad():
                logits[device] = fake_quant_decoder(qm)(held)[0]
        out[method] = float((logits["cpu"] - logits["cuda"]).abs().max())
    return out


def llama8b_shape(d: Path, layers: int) -> Path:
    """Llama-3-8B's shape with `layers` layers, from scripts/make_model.py (weights seeded by tensor name)."""
    make_base(d, shape_of("llama3-8b", layers=layers), dtype="bfloat16", device="cuda")
    return d


# ------------------------------------------------------------------------------------- one measured run


def run_ours(merged: str, calib: torch.Tensor, name: str, profile: bool) -> dict:
    timers = install_timers() if profile else None
    marks: list[float] = []
    t0 = time.perf_counter()
    quantize_checkpoint(
        merged,
        our_config(name, "cuda"),
        calib_ids=calib,
        progress=lambda m: marks.append(time.perf_counter() - t0),
    )
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    per_layer = [round(b - a, 2) for a, b in zip([0.0, *marks], marks)]
    return {"wall_s": wall, "layer_s": per_layer, "phases": None if timers is None else dict(timers)}


def install_timers() -> dict:
    """Wrap the walk's phases in CUDA-synchronized timers (nested phases overlap: run ⊃ hessian)."""
    from lorafast_export.quant import blocks, gptq, methods

    timers: dict[str, float] = defaultdict(float)

    def wrap(owner, attr: str, key: str) -> None:
        fn = getattr(owner, attr)

        def timed(*a, **k):
            torch.cuda.synchronize()
            t = time.perf_counter()
            out = fn(*a, **k)
            torch.cuda.synchronize()
            timers[key] += time.perf_counter() - t
            return out

        setattr(owner, attr, timed)

    wrap(blocks.Block, "run", "block forwards (incl. hooks)")
    wrap(blocks.Block, "sub_forward", "awq candidate forwards (attention / MLP)")
    wrap(methods, "accumulate_hessian", "hessian accumulation")
    wrap(methods, "gptq_quantize_many", "gptq solve (total)")
    wrap(gptq, "inverse_hessian_cholesky", "gptq cholesky inverse")
    wrap(gptq, "_gptq_sweep", "gptq column sweep")
    wrap(gptq, "_gptq_sweep_static", "gptq column sweep (static groups)")
    wrap(gptq, "_static_params", "gptq static group params (+ range search)")
    wrap(methods, "awq_scale_finalists", "awq scale grid (total)")
    wrap(methods, "_gptq_choice", "awq-gptq scale choice (its trial solves)")
    wrap(methods, "awq_search_clip", "awq clip search")
    wrap(methods, "quantize_rtn", "awq final rtn")
    return timers


def run_llmcompressor(merged: str, calib: torch.Tensor, method: str) -> dict:
    """llm-compressor's oneshot with its defaults (batch 1, sequential pipeline onloading layers to CUDA),
    the GPTQ recipe of bench/quant_peers.py (sym, g128, damp 0.01, no act-order) or AWQ + W4A16_ASYM."""
    import transformers
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.core import LifecycleCallbacks
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier

    model = transformers.AutoModelForCausalLM.from_pretrained(merged, dtype="auto")
    ds = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
    if method == "gptq":
        config_groups = {
            "group_0": {
                "targets": ["Linear"],
                "weights": {
                    "num_bits": 4,
                    "type": "int",
                    "symmetric": True,
                    "strategy": "group",
                    "group_size": 128,
                    "actorder": None,
                },
            }
        }
        recipe = GPTQModifier(
            config_groups=config_groups, ignore=["lm_head"], dampening_frac=0.01, block_size=128
        )
    else:
        recipe = [
            AWQModifier(),
            QuantizationModifier(ignore=["lm_head"], scheme="W4A16_ASYM", targets=["Linear"]),
        ]
    marks: list[float] = []
    epoch_end = LifecycleCallbacks.sequential_epoch_end  # once per subgraph (embedding, each layer; AWQ once
    # more at the end), after that subgraph's calibration; the layer is quantized / smoothed inside it

    def mark(*a, **k):
        out = epoch_end(*a, **k)
        torch.cuda.synchronize()
        marks.append(time.perf_counter() - t0)
        return out

    LifecycleCallbacks.sequential_epoch_end = staticmethod(mark)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    oneshot(
        model=model,
        dataset=ds,
        recipe=recipe,
        max_seq_length=calib.shape[1],
        num_calibration_samples=calib.shape[0],
    )
    torch.cuda.synchronize()
    n = model.config.num_hidden_layers
    ends = marks[1 : 1 + n] if len(marks) > n else marks  # subgraph 0 is the embedding alone; then the layers
    per_layer = [round(b - a, 2) for a, b in zip([0.0, *ends], ends)]
    return {"wall_s": time.perf_counter() - t0, "layer_s": per_layer, "marks": marks, "phases": None}


def one_run(a) -> None:
    calib = torch.load(a.calib)
    torch.zeros(1, device="cuda")  # the CUDA context is not part of either timing
    torch.cuda.reset_peak_memory_stats()
    if a.impl == "ours":
        res = run_ours(a.merged, calib, a.method, a.profile)
    else:
        res = run_llmcompressor(a.merged, calib, a.method)
    res["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    print("RESULT " + json.dumps(res), flush=True)


def measure(
    impl: str, method: str, merged: Path, calib: Path, profile: bool = False, timeout: float | None = None
) -> dict | None:
    cmd = [sys.executable, __file__, "--one", impl, method, str(merged), str(calib)] + (
        ["--profile"] * profile
    )
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"{impl} {method}: not finished after {timeout:.0f}s (stopped)", flush=True)
        return None
    if LOG_DIR is not None:  # the run's own output (llm-compressor's progress bars and timings)
        (LOG_DIR / f"{impl}-{method}-{merged.name}.log").write_text(
            p.stdout + "\n--- stderr ---\n" + p.stderr
        )
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    print(f"{impl} {method} failed (rc {p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}", flush=True)
    return None


def sweep_bench() -> list[dict]:
    """GPTQ's column sweep alone at 8B shapes (stacked q/k/v, down_proj): the Triton kernel vs the torch loop."""
    from lorafast_export.quant import gptq

    kernel, rows = gptq._triton_sweep_kernel, []
    for name, out, n in (("q/k/v stacked", 6144, 4096), ("down_proj", 4096, 14336)):
        x = torch.randn(8192, n, device="cuda")
        H = gptq.accumulate_hessian(None, 0, x)[0]
        Hinv = gptq.inverse_hessian_cholesky(H, 0.01)
        w = torch.randn(out, n, device="cuda") * 0.02
        res = {}
        for impl, k in (("triton", kernel), ("torch loop", None)):
            if impl == "triton" and kernel is None:
                continue
            gptq._triton_sweep_kernel = k
            gptq._gptq_sweep(w.clone(), Hinv, 4, 128, True, 128, torch.float16)  # warm-up (Triton compiles)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            res[impl] = gptq._gptq_sweep(w.clone(), Hinv, 4, 128, True, 128, torch.float16)[0]
            torch.cuda.synchronize()
            rows.append({"matrix": name, "impl": impl, "s": round(time.perf_counter() - t0, 3)})
        if len(res) == 2:
            rows.append({"matrix": name, "codes_equal": bool(torch.equal(res["triton"], res["torch loop"]))})
    gptq._triton_sweep_kernel = kernel
    return rows


# -------------------------------------------------------------------------------------------- accuracy


def demo_accuracy(samples: int, seq_len: int) -> list[dict]:
    """KL(fp32 model ‖ quantized) of the demo base, the walk on CUDA in bf16 vs float32 (TF32)."""
    from transformers import AutoTokenizer

    from lorafast_export.model.decoder import load_decoder
    from lorafast_export.paths import TEXT_DIR
    from lorafast_export.quant import blocks
    from lorafast_export.quant.calib import load_calibration
    from lorafast_export.weights import open_model

    base = DEMO_DIR / "base"
    calib = load_calibration(base, {"samples": samples, "seq_len": seq_len})
    tok = AutoTokenizer.from_pretrained(str(base))
    ids = torch.cat(
        [
            torch.tensor(tok((TEXT_DIR / f).read_text())["input_ids"][: 8 * 256]).view(8, 256)
            for f in ("prose_eval.txt", "code_eval.txt")
        ]
    )
    with torch.no_grad():
        ref = load_decoder(open_model(base))(ids)[0].log_softmax(-1)
    rows = []
    for method, gs in (("gptq", 128), ("awq", 128), ("gptq", 32), ("awq", 32)):
        for walk, dtype in (("bf16", torch.bfloat16), ("fp32+tf32", None)):
            blocks.CUDA_COMPUTE_DTYPE = dtype
            t0 = time.perf_counter()
            qm = quantize_checkpoint(
                base, {"method": method, "group_size": gs, "device": "cuda"}, calib_ids=calib
            )
            dt = time.perf_counter() - t0
            with torch.no_grad():
                got = fake_quant_decoder(qm)(ids)[0].float().log_softmax(-1)
            kl = (ref.exp() * (ref - got)).sum(-1)
            rows.append(
                {
                    "method": f"{method} g{gs}",
                    "walk": walk,
                    "kl_mean": float(kl.mean()),
                    "kl_p99": float(kl.flatten().quantile(0.99)),
                    "top1": float((ref.argmax(-1) == got.argmax(-1)).float().mean()),
                    "s": dt,
                }
            )
    blocks.CUDA_COMPUTE_DTYPE = torch.bfloat16
    return rows


# ------------------------------------------------------------------------------------------------ main


def speed_rows(tmp: Path, a) -> list[tuple]:
    calib_path = tmp / "calib.pt"
    torch.save(
        torch.randint(
            0,
            PRESETS["llama3-8b"]["vocab"],
            (a.samples, a.seq_len),
            generator=torch.Generator().manual_seed(0),
        ),
        calib_path,
    )
    runs = []
    if a.layers:
        merged = llama8b_shape(tmp / "llama8b", a.layers)
        for method in a.methods:
            runs.append(("ours", method, merged, a.layers, a.profile))
            if a.peers and method in ("gptq", "awq"):
                runs.append(("llmcompressor", method, merged, a.layers, False))
    rows = [run_and_print(*r, calib_path, a.peer_timeout) for r in runs]
    if a.full_layers:
        full = llama8b_shape(tmp / f"llama8b-{a.full_layers}", a.full_layers)
        rows += [run_and_print("ours", m, full, a.full_layers, False, calib_path) for m in a.methods]
    return rows


def run_and_print(
    impl: str,
    method: str,
    merged: Path,
    n: int,
    profile: bool,
    calib: Path,
    peer_timeout: float | None = None,
) -> tuple:
    res = measure(impl, method, merged, calib, profile, timeout=peer_timeout if impl != "ours" else None)
    if res is not None:
        lay = res["layer_s"]
        steady = (
            f"; first layer {lay[0]:.2f}s, later layers {sum(lay[1:]) / (n - 1):.2f}s each"
            if n > 1 and lay
            else ""
        )
        print(
            f"{impl} {method} on {n} layers: {res['wall_s']:.1f}s = {res['wall_s'] / n:.2f}s/layer{steady}; "
            f"peak {res['peak_gib']:.1f} GiB; per layer {lay}"
            + (f"; subgraph ends at {[round(m, 2) for m in res['marks']]}s" if res.get("marks") else ""),
            flush=True,
        )
        for k, v in (res.get("phases") or {}).items():
            print(f"    {k:45s} {v:7.2f} s", flush=True)
    return impl, method, n, res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--one", nargs=4, metavar=("IMPL", "METHOD", "MERGED", "CALIB"), help=argparse.SUPPRESS)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--full-layers", type=int, default=0)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--methods", nargs="+", default=["gptq", "awq"], choices=sorted(OURS))
    ap.add_argument("--peers", action="store_true")
    ap.add_argument(
        "--peer-timeout", type=float, default=None, help="stop a peer's run after this many seconds"
    )
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--accuracy", action="store_true")
    ap.add_argument("--sweep", action="store_true", help="GPTQ column sweep alone: Triton vs the torch loop")
    ap.add_argument("--skip-tiny", action="store_true")
    ap.add_argument("--logs", type=Path, help="write each measured run's output to this folder")
    a = ap.parse_args()
    if a.one:
        a.impl, a.method, a.merged, a.calib = a.one
        return one_run(a)
    global LOG_DIR
    LOG_DIR = a.logs
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        if not a.skip_tiny:
            print("tiny model, max |logits cpu - cuda|:", json.dumps(tiny_cpu_vs_cuda(tmp)), flush=True)
        if a.sweep:
            for r in sweep_bench():
                print("sweep " + json.dumps(r), flush=True)
        if a.accuracy:
            for r in demo_accuracy(32, 512):
                print("accuracy " + json.dumps(r), flush=True)
        rows = speed_rows(tmp, a)
    print(
        "\n| impl | method | layers | total s | first layer s | later layers s / layer | 32 layers, min | "
        "peak GiB |\n|---|---|---|---|---|---|---|---|"
    )
    for impl, m, n, res in rows:
        if res is not None:
            print(table_row(impl, m, n, res))


def table_row(impl: str, method: str, n: int, res: dict) -> str:
    """32 layers: measured when n = 32, else first layer + 31 x the mean of the later ones (wall / n x 32
    where no per-layer times exist)."""
    lay = res["layer_s"]
    if n == 32:
        est, first, later = f"{res['wall_s'] / 60:.2f} (measured)", lay[0], sum(lay[1:]) / 31
    elif len(lay) == n > 1:
        first, later = lay[0], sum(lay[1:]) / (n - 1)
        est = f"{(first + 31 * later) / 60:.2f} (est.)"
    else:
        first = later = float("nan")
        est = f"{res['wall_s'] / n * 32 / 60:.2f} (est.)"
    return (
        f"| {impl} | {method} | {n} | {res['wall_s']:.1f} | {first:.2f} | {later:.2f} | {est} | "
        f"{res['peak_gib']:.1f} |"
    )


if __name__ == "__main__":
    main()
