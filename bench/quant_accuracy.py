"""Accuracy of our RTN / GPTQ / AWQ against the unmerged fp32 reference (and peers on the same tokens).

    .venv/bin/python bench/quant_accuracy.py --out /tmp/qbench                # demo:base + demo:lora
    .venv/bin/python bench/quant_accuracy.py --base DIR --adapter DIR --text-dir DIR --out /tmp/qbench \
        --methods rtn gptq awq awq-noclip --peer llmcompressor-gptq=/tmp/llmc-venv/bin/python

Steps: merge (lorafast_export.merge, what `lorafast-export merge` runs) → calibration ids from the bundled
calib.txt (samples x seq_len, seed 0; saved to OUT/calib_ids.pt so peers see the same tokens) → for each
method: quantize_checkpoint + fake-quant decoder logits on the eval blocks → metrics against the base with its
adapter UNMERGED (transformers + PEFT, fp32): per-token KL mean / p99, same top-1, perplexity ratio, wall time
(OUT/results.json; the per-token KL of every row in OUT/kl_tokens.pt, for paired comparisons).
A peer is a python executable of a venv holding that library; bench/quant_peers.py runs inside it with the
bits, group size and symmetry our own run of the peer's method resolved (NAME is LIBRARY-METHOD[-VARIANT]).
A method is one of ours, or a variant from VARIANTS (awq-noclip: AWQ without the clipping search, the setting
of llm-compressor's AWQ, which has none; rtn-sym: symmetric RTN, against nncf-rtn-sym).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.quant_metrics import open_reference, stream_tokens, summary, write_reference  # noqa: E402
from lorafast_export.adapters import open_adapter  # noqa: E402
from lorafast_export.merge import merge  # noqa: E402
from lorafast_export.model.decoder import load_decoder  # noqa: E402
from lorafast_export.model.quantized import fake_quant_decoder  # noqa: E402
from lorafast_export.quant.calib import load_calibration  # noqa: E402
from lorafast_export.quant.config import resolve_quant  # noqa: E402
from lorafast_export.quant.walk import quantize_checkpoint  # noqa: E402
from lorafast_export.recipe import DEMO_DIR, TEXT_DIR, CalibOptions  # noqa: E402
from lorafast_export.weights import open_model  # noqa: E402

VARIANTS = {
    "awq-noclip": {"method": "awq", "awq_clip": False},  # name → our quant settings
    "rtn-sym": {"method": "rtn", "symmetric": True},
    "gptq-search": {"method": "gptq", "range_search": True},  # the default since session 7
    "awq-gptq-search": {"method": "awq-gptq", "range_search": True},  # the default since session 7
    "gptq-nosearch": {"method": "gptq", "range_search": False},
    "awq-gptq-nosearch": {"method": "awq-gptq", "range_search": False},
    "gptq-act": {"method": "gptq", "act_order": True},
    "gptq-natural": {"method": "gptq", "static_act_order": False},  # the default before issue 14's change
    "awq-gptq-natural": {"method": "awq-gptq", "static_act_order": False},
    "gptq-damp0.1": {"method": "gptq", "damp_percent": 0.1},
    "gptq-damp0.001": {"method": "gptq", "damp_percent": 0.001},
}
for _m in ("gptq", "awq-gptq"):  # the scale refit after the sweep (the default since session 10) on / off
    VARIANTS[f"{_m}-refit"] = {"method": _m, "scale_refit": True}
    VARIANTS[f"{_m}-norefit"] = {"method": _m, "scale_refit": False}
# Candidates measured for issue 14 that are config fields (quant/config.py) but not recipe options: the bench
# sets them on the resolved config.
EXPERIMENTS = {  # config fields set explicitly (act_order + static_groups: see GPTQConfig)
    "gptq-static": {
        "method": "gptq",
        "act_order": False,
        "static_groups": True,
    },  # natural order, fixed groups
    "gptq-onepass": {"method": "gptq", "true_sequential": False},
    "gptq-truesequential": {"method": "gptq", "true_sequential": True},  # the default before session 8
    "awq-gptq-onepass": {"method": "awq-gptq", "true_sequential": False},
    "awq-gptq-truesequential": {"method": "awq-gptq", "true_sequential": True},
    "gptq-natural-onepass": {
        "method": "gptq",
        "act_order": False,
        "static_groups": False,
        "true_sequential": False,
    },
}
for _score in ("awq", "gptq"):  # awq-gptq's scale: AWQ's best, or the finalist of lowest GPTQ error
    EXPERIMENTS[f"awq-gptq-{_score}score"] = {"method": "awq-gptq", "scale_score": _score}
    EXPERIMENTS[f"awq-gptq-{_score}score-search"] = {
        "method": "awq-gptq",
        "scale_score": _score,
        "range_search": True,
    }
for _n in (
    6,
    10,
    21,
):  # GPTQ's error chooses among more of AWQ's candidates (21: every one of the grid and s = 1)
    EXPERIMENTS[f"awq-gptq-fin{_n}"] = {"method": "awq-gptq", "choice_finalists": _n}
# session 7's awq-gptq default: the range search in the scale choice's trial solves too
EXPERIMENTS["awq-gptq-choicesearch"] = {
    "method": "awq-gptq",
    "range_search": True,
    "choice_search": True,
}
CONFIG_ONLY = ("static_groups", "true_sequential", "scale_score", "choice_search", "choice_finalists")


def eval_blocks(tokenizer, path: Path, block: int, n_blocks: int) -> torch.Tensor:
    ids = tokenizer(path.read_text())["input_ids"]
    n = min(n_blocks, len(ids) // block)
    return torch.tensor(ids[: n * block]).view(n, block)


def merged_calib_eval(a, adapters: list) -> tuple[Path, torch.Tensor, torch.Tensor]:
    """a.out/merged (the base with `adapters` merged, made once), the calibration ids (a.samples x a.seq_len from
    a.text_dir/calib.txt) and the eval ids (a.eval_blocks blocks of a.block tokens, half code, half prose)."""
    from transformers import AutoTokenizer

    merged = a.out / "merged"
    if not (merged / "config.json").exists():
        merge(open_model(a.base), adapters, merged)
    tok = AutoTokenizer.from_pretrained(merged)
    calib = load_calibration(
        merged,
        CalibOptions(files=[str(a.text_dir / "calib.txt")], samples=a.samples, seq_len=a.seq_len, seed=0),
    )
    halves = [
        eval_blocks(tok, a.text_dir / f, a.block, a.eval_blocks // 2)
        for f in ("code_eval.txt", "prose_eval.txt")
    ]
    return merged, calib, torch.cat(halves)


def reference_blocks(base: Path, adapter: Path, ids: torch.Tensor):
    """Logits [seq, vocab] of each eval block from the base with its adapter UNMERGED (transformers + PEFT, fp32)."""
    import peft
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(model, adapter).eval()  # unmerged: what the user trained
    with torch.no_grad():
        for b in ids:
            yield model(input_ids=b[None]).logits[0]


def save_atomic(t: torch.Tensor, path: Path) -> None:
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    torch.save(t, tmp)
    tmp.rename(path)


def cached_reference(out: Path, base: Path, adapter: Path, ids: torch.Tensor) -> tuple[np.memmap, bool]:
    """The reference logits in OUT (raw float32, memory-mapped), shared by every run on the same eval ids;
    computed here if absent or made for other ids. Returns (reference, computed now)."""
    path, ids_path = out / "ref_logits.f32", out / "ref_ids.pt"
    fresh = not (path.exists() and ids_path.exists() and torch.equal(torch.load(ids_path), ids))
    if fresh:
        write_reference(path, reference_blocks(base, adapter, ids))
        torch.save(ids, ids_path)
    return open_reference(path, ids), fresh


def peer_symmetric(peer: str, forced: bool | None = None) -> bool:
    """LIBRARY-METHOD[-VARIANT]: the symmetry of our run of METHOD-VARIANT if that is one of VARIANTS, else METHOD
    (forced: --symmetric, for every row)."""
    if forced is not None:
        return forced
    method = peer.split("-", 1)[1]
    settings = VARIANTS.get(method, {"method": method.split("-")[0]})
    return resolve_quant(settings).symmetric


def our_config(method: str, bits: int, group_size: int, symmetric: bool | None = None, device: str = "cpu"):
    """The QuantConfig of one of our rows: a method, or a name from VARIANTS / EXPERIMENTS."""
    settings = {
        **{**VARIANTS, **EXPERIMENTS}.get(method, {"method": method}),
        "bits": bits,
        "group_size": group_size,
        "device": device,
    }
    if symmetric is not None:
        settings["symmetric"] = symmetric
    extra = {k: settings.pop(k) for k in CONFIG_ONLY if k in settings}
    if extra and "act_order" in settings:  # a config-level order (with static_groups), not the recipe's
        extra["act_order"] = settings.pop("act_order")
    return dataclasses.replace(resolve_quant(settings), **extra)


def run_ours(
    merged: Path,
    method: str,
    bits: int,
    group_size: int,
    calib: torch.Tensor,
    ids: torch.Tensor,
    ref: np.memmap,
    symmetric: bool | None = None,
):
    qc = our_config(method, bits, group_size, symmetric)
    t0, c0 = time.perf_counter(), time.process_time()
    qm = quantize_checkpoint(merged, qc, calib_ids=calib)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    dec = fake_quant_decoder(qm)
    return stream_tokens(lambda b: dec(b)[0], ids, ref), (wall, cpu), qm.settings


def run_peer(
    name: str,
    python: str,
    merged: Path,
    out: Path,
    bits: int,
    group_size: int,
    forced: bool | None = None,
    eval_stride: int = 1,
) -> tuple:
    """Run bench/quant_peers.py in the peer's venv; it writes its per-token statistics against OUT's reference
    (bench/quant_metrics.py) and its quantization wall / CPU time."""
    symmetric = peer_symmetric(name, forced)  # the same symmetry as our run of that method, or --symmetric
    res = out / f"peer-{name}-g{group_size}-{'sym' if symmetric else 'asym'}.pt"
    cmd = [
        python,
        str(ROOT / "bench" / "quant_peers.py"),
        name,
        str(merged),
        str(out / "calib_ids.pt"),
        str(out / "eval_ids.pt"),
        str(out / "ref_logits.f32"),
        str(res),
        "--bits",
        str(bits),
        "--group-size",
        str(group_size),
        "--symmetric",
        str(int(symmetric)),
        "--eval-stride",
        str(eval_stride),
    ]
    subprocess.run(
        cmd,
        check=True,
        env={
            "GPTQMODEL_CPU_WORKERS": "2",
            "PATH": "/usr/bin:/bin",
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            **{k: os.environ[k] for k in ("OMP_NUM_THREADS",) if k in os.environ},  # peers as ours
        },
    )
    r = torch.load(res)
    return r["tokens"], (r["wall_s"], r["cpu_s"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", type=Path, default=DEMO_DIR / "base")
    ap.add_argument("--adapter", type=Path, default=DEMO_DIR / "lora")
    ap.add_argument("--text-dir", type=Path, default=TEXT_DIR)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument(
        "--methods", nargs="*", default=["rtn", "gptq", "awq"], help=f"ours, or {sorted(VARIANTS)}"
    )
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-blocks", type=int, default=16)
    ap.add_argument("--block", type=int, default=256)
    ap.add_argument(
        "--eval-stride", type=int, default=1, help="score every k-th eval block only (quick looks)"
    )
    ap.add_argument("--peer", action="append", default=[], help="NAME=PYTHON (see bench/quant_peers.py)")
    ap.add_argument(
        "--symmetric", type=int, choices=[0, 1], help="every row (ours and peers) at this symmetry"
    )
    ap.add_argument(
        "--tag", default="", help="suffix of results-TAG.json / kl_tokens-TAG.pt (runs sharing OUT)"
    )
    a = ap.parse_args()
    forced = None if a.symmetric is None else bool(a.symmetric)
    torch.manual_seed(0)
    a.out.mkdir(parents=True, exist_ok=True)

    merged, calib, ids = merged_calib_eval(a, [open_adapter(str(a.adapter))])
    save_atomic(calib, a.out / "calib_ids.pt")  # row processes sharing OUT may be reading them
    save_atomic(ids, a.out / "eval_ids.pt")
    ref, fresh = cached_reference(a.out, a.base, a.adapter, ids)
    if a.eval_stride > 1:  # a quicker look: every k-th eval block (the reference is still computed on all)
        ids, ref = ids[:: a.eval_stride], ref[:: a.eval_stride]
    table, kls = {}, {}

    def add(name: str, tokens: dict[str, torch.Tensor], wall: tuple[float, float]) -> None:
        table[name] = {**summary(tokens), "wall_s": round(wall[0], 2), "cpu_s": round(wall[1], 2)}
        kls[name] = tokens["kl"]
        print(f"{name}: KL {table[name]['kl_mean']:.5f}, {wall[0]:.1f}s wall, {wall[1]:.1f}s cpu", flush=True)
        save()  # after every row: a run stopped half-way keeps what it measured

    def save() -> None:
        tag = f"-{a.tag}" if a.tag else ""
        torch.save(kls, a.out / f"kl_tokens{tag}.pt")  # paired comparisons
        (a.out / f"results{tag}.json").write_text(
            json.dumps(
                {
                    "calib": list(calib.shape),
                    "eval": list(ids.shape),
                    "bits": a.bits,
                    "group_size": a.group_size,
                    "symmetric": forced,
                    "load_avg": os.getloadavg(),
                    "results": table,
                },
                indent=2,
            )
        )

    if fresh:  # once per OUT: the run that computes the reference also scores the unquantized merge
        dec = load_decoder(open_model(merged))
        add("merged, not quantized", stream_tokens(lambda b: dec(b)[0], ids, ref), (0.0, 0.0))
        del dec
    for m in a.methods:
        tokens, wall, _ = run_ours(merged, m, a.bits, a.group_size, calib, ids, ref, forced)
        add(f"ours {m}", tokens, wall)
    for spec in a.peer:
        name, python = spec.split("=", 1)
        try:
            add(name, *run_peer(name, python, merged, a.out, a.bits, a.group_size, forced, a.eval_stride))
        except (subprocess.CalledProcessError, OSError) as e:
            print(f"peer {name} failed: {e}", flush=True)
    print(f"\ncalib {tuple(calib.shape)} tokens, eval {tuple(ids.shape)}; {a.bits}-bit g{a.group_size}\n")
    print(
        "| model | KL mean | KL p99 | same top-1 | ppl ratio | wall s | cpu s |\n|---|---|---|---|---|---|---|"
    )
    for k, r in table.items():
        print(
            f"| {k} | {r['kl_mean']:.5f} | {r['kl_p99']:.4f} | {r['top1']:.3f} | {r['ppl_ratio']:.4f} | "
            f"{r['wall_s']:.1f} | {r['cpu_s']:.1f} |"
        )


if __name__ == "__main__":
    main()
