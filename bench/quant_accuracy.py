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
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

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
    "gptq-search": {"method": "gptq", "range_search": True},
    "awq-gptq-search": {"method": "awq-gptq", "range_search": True},
}


def eval_blocks(tokenizer, path: Path, block: int, n_blocks: int) -> torch.Tensor:
    ids = tokenizer(path.read_text())["input_ids"]
    n = min(n_blocks, len(ids) // block)
    return torch.tensor(ids[: n * block]).view(n, block)


@torch.no_grad()
def reference_logits(base: Path, adapter: Path, ids: torch.Tensor) -> torch.Tensor:
    import peft
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(model, adapter).eval()  # unmerged: what the user trained
    return torch.cat([model(input_ids=b[None]).logits.float() for b in ids])


def cached_reference(path: Path, base: Path, adapter: Path, ids: torch.Tensor) -> torch.Tensor:
    """reference_logits, kept in OUT (float32) for runs that share OUT and so the same eval ids."""
    if path.exists():
        cached = torch.load(path)
        if torch.equal(cached["ids"], ids):
            return cached["logits"]
    ref = reference_logits(base, adapter, ids)
    torch.save({"ids": ids, "logits": ref}, path)
    return ref


@torch.no_grad()
def decoder_logits(dec, ids: torch.Tensor) -> torch.Tensor:
    return torch.cat([dec(b[None])[0].float() for b in ids])


def token_kl(ref: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
    lr, lc = ref.log_softmax(-1), cand.log_softmax(-1)  # [n, s, V]
    return (lr.exp() * (lr - lc)).sum(-1).flatten()  # [n·s]


def metrics(ref: torch.Tensor, cand: torch.Tensor, ids: torch.Tensor) -> dict:
    lr, lc = ref.log_softmax(-1), cand.log_softmax(-1)  # [n, s, V]
    kl = token_kl(ref, cand)
    labels = ids[:, 1:]
    nll = lambda lp: float(-lp[:, :-1].gather(-1, labels[..., None]).mean())  # noqa: E731
    return {
        "kl_mean": float(kl.mean()),
        "kl_p99": float(kl.quantile(0.99)),
        "top1": float((lr.argmax(-1) == lc.argmax(-1)).float().mean()),
        "ppl_ratio": float(torch.exp(torch.tensor(nll(lc) - nll(lr)))),
    }


def peer_symmetric(peer: str, forced: bool | None = None) -> bool:
    """LIBRARY-METHOD[-VARIANT]: the symmetry of our run of METHOD-VARIANT if that is one of VARIANTS, else METHOD
    (forced: --symmetric, for every row)."""
    if forced is not None:
        return forced
    method = peer.split("-", 1)[1]
    settings = VARIANTS.get(method, {"method": method.split("-")[0]})
    return resolve_quant(settings).symmetric


def run_ours(
    merged: Path,
    method: str,
    bits: int,
    group_size: int,
    calib: torch.Tensor,
    ids: torch.Tensor,
    symmetric: bool | None = None,
):
    settings = {
        **VARIANTS.get(method, {"method": method}),
        "bits": bits,
        "group_size": group_size,
        "device": "cpu",
    }
    if symmetric is not None:
        settings["symmetric"] = symmetric
    t0, c0 = time.perf_counter(), time.process_time()
    qm = quantize_checkpoint(merged, settings, calib_ids=calib)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return decoder_logits(fake_quant_decoder(qm), ids), (wall, cpu), qm.settings


def run_peer(
    name: str, python: str, merged: Path, out: Path, bits: int, group_size: int, forced: bool | None = None
) -> tuple:
    """Run bench/quant_peers.py in the peer's venv; it writes logits on OUT/eval_ids.pt and its wall time."""
    symmetric = peer_symmetric(name, forced)  # the same symmetry as our run of that method, or --symmetric
    res = out / f"peer-{name}-g{group_size}-{'sym' if symmetric else 'asym'}.pt"
    cmd = [
        python,
        str(ROOT / "bench" / "quant_peers.py"),
        name,
        str(merged),
        str(out / "calib_ids.pt"),
        str(out / "eval_ids.pt"),
        str(res),
        "--bits",
        str(bits),
        "--group-size",
        str(group_size),
        "--symmetric",
        str(int(symmetric)),
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
    res.unlink()  # [tokens, vocab] float32: 1.5 GB on the 30M fixture's eval set
    return r["logits"], (r["wall_s"], r["cpu_s"])


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
    from transformers import AutoTokenizer

    merged = a.out / "merged"
    if not (merged / "config.json").exists():
        merge(open_model(a.base), [open_adapter(str(a.adapter))], merged)
    tok = AutoTokenizer.from_pretrained(merged)
    calib = load_calibration(
        merged,
        CalibOptions(files=[str(a.text_dir / "calib.txt")], samples=a.samples, seq_len=a.seq_len, seed=0),
    )
    ids = torch.cat(
        [
            eval_blocks(tok, a.text_dir / f, a.block, a.eval_blocks // 2)
            for f in ("code_eval.txt", "prose_eval.txt")
        ]
    )
    torch.save(calib, a.out / "calib_ids.pt")
    torch.save(ids, a.out / "eval_ids.pt")
    ref = cached_reference(a.out / "ref_logits.pt", a.base, a.adapter, ids)
    table, kls = {}, {}

    def add(name: str, logits: torch.Tensor, wall: tuple[float, float]) -> None:
        # metrics at once: a row's logits are [tokens, vocab] (1.5 GB on the 30M fixture), never kept
        table[name] = {**metrics(ref, logits, ids), "wall_s": round(wall[0], 2), "cpu_s": round(wall[1], 2)}
        kls[name] = token_kl(ref, logits)
        print(f"{name}: KL {table[name]['kl_mean']:.5f}, {wall[0]:.1f}s wall, {wall[1]:.1f}s cpu", flush=True)

    add("merged, not quantized", decoder_logits(load_decoder(open_model(merged)), ids), (0.0, 0.0))
    for m in a.methods:
        logits, wall, _ = run_ours(merged, m, a.bits, a.group_size, calib, ids, forced)
        add(f"ours {m}", logits, wall)
        del logits
    for spec in a.peer:
        name, python = spec.split("=", 1)
        try:
            add(name, *run_peer(name, python, merged, a.out, a.bits, a.group_size, forced))
        except (subprocess.CalledProcessError, OSError) as e:
            print(f"peer {name} failed: {e}", flush=True)
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
