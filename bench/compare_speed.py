"""CPU time of validation's comparison step (validate/run.py::_compare), before and after the change to
lorafast_export/validate/metrics.py, in the same process.

    python bench/compare_speed.py [--tokens 8160] [--vocab 2048] [--repeats 3] [--threads N] [--chunk LOGITS]
                                  [--compact] [--device cuda]

One eval set of float32 logits: a reference and 4 candidate stages (a merged FP32 model: logits x (1 + 1e-7
noise); bf16 rounding; int8-like noise 0.02; int4-like noise 0.2), compared as _compare does: every stage with
the reference (its cached label log-probs and argmax given) and with the stage before it, row block by row
block (rows_per_chunk), through LogProbs and MetricAccumulator.update_logprobs; --compact: the reference as the
compact cache holds it (float16 of log p + entropy, its exact label log-probs and argmax beside it). "old" is
the previous code, copied below verbatim (float64 log-softmax, argmax over float64, blocks of 4M logits); "old,
new blocks" is that code on the new block size, to show how much of the gain is the block size alone. Prints
wall and CPU seconds (process time: both threads, and the kernel's page faulting) per repeat (min / median),
the minor page faults, the largest relative difference of the metrics, and each comparison's KL mean against
an exact float64 evaluation."""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lorafast_export.validate import metrics  # noqa: E402
from lorafast_export.validate.metrics import TOKEN_METRICS, MetricAccumulator  # noqa: E402

# ----------------------------------------------------------------------------- the previous code (verbatim)


class OldLogProbs:
    def __init__(self, logits, normalized=False, argmax=None):
        self.logp = logits if normalized else torch.log_softmax(logits.to(torch.float64), dim=-1)
        self._p = None
        self._argmax = None if argmax is None else argmax.long()

    @property
    def p(self):
        if self._p is None:
            self._p = self.logp.exp()
        return self._p

    @property
    def argmax(self):
        if self._argmax is None:
            self._argmax = self.logp.argmax(-1)
        return self._argmax


def old_kl(ref, logp_cand):
    terms = torch.sub(ref.logp, logp_cand)
    kl = terms.mul_(ref.p).sum(dim=-1)
    bad = torch.isnan(kl)
    if bool(bad.any()):
        rows = bad.nonzero().squeeze(-1)
        p, lr = ref.p[rows], ref.logp[rows]
        kl[rows] = torch.where(p > 0, p * (lr - logp_cand[rows]), torch.zeros_like(p)).sum(dim=-1)
    return kl.clamp_min(0.0)


def old_compare_logprobs(ref, cand, labels, ref_label_logp=None):
    idx = labels.long().unsqueeze(-1)
    lr = ref.logp.gather(-1, idx).squeeze(-1) if ref_label_logp is None else ref_label_logp.to(torch.float64)
    lc = cand.logp.gather(-1, idx).squeeze(-1)
    stats = {
        "kl": old_kl(ref, cand.logp),
        "top1": (ref.argmax == cand.argmax).to(torch.float64),
        "logp_ref": lr,
        "logp_cand": lc,
        "p_ref": lr.exp(),
        "p_cand": lc.exp(),
    }
    return {k: v.detach().cpu().numpy() for k, v in stats.items()}


OLD_CHUNK_ELEMENTS, OLD_CHUNK_ELEMENTS_GPU = 1 << 22, 1 << 26


class OldAccumulator(MetricAccumulator):
    def update_logprobs(self, ref, cand, labels, positions, ref_label_logp=None):
        self._add(old_compare_logprobs(ref, cand, labels, ref_label_logp), positions.cpu())


# ----------------------------------------------------------------------------- the benchmark


def eval_set(tokens: int, vocab: int, compact: bool = False, device: str = "cpu", seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ref = 2.5 * torch.randn(tokens, vocab, generator=g)
    ref += 8.0 * (torch.rand(tokens, vocab, generator=g) < 2.0 / vocab)  # a few likely tokens per row
    noise = lambda: torch.randn(tokens, vocab, generator=g)  # noqa: E731
    cands = [
        ref * (1 + 1e-7 * noise()),  # merged FP32: float rounding of the logits
        ref.bfloat16().float(),  # a bf16 export
        ref + 0.02 * noise(),  # int8-like
        ref + 0.2 * noise(),  # int4-like
    ]
    labels = torch.randint(vocab, (tokens,), generator=g)
    logp = torch.log_softmax(ref.double(), -1)
    ref_label, ref_argmax = logp.gather(-1, labels[:, None])[:, 0], logp.argmax(-1)  # what the cache stores
    if compact:  # reference.py's compact form, read back as float32
        ref = (logp - (logp.exp() * logp).sum(-1, keepdim=True)).clamp(-6.0e4, 6.0e4).half().float()
    return tuple(t.to(device) for t in (ref, ref_label, ref_argmax)) + (
        [c.to(device) for c in cands],
        labels.to(device),
    )


def exact_kl_mean(ref: torch.Tensor, cand: torch.Tensor, rows: int = 512) -> float:
    """Mean KL of float32 logits, exactly: float64 throughout in the form where nothing cancels (delta exact,
    g = exp(-u) - 1 + u by its series or expm1; tests/validate/test_metrics.py checks it against mpmath)."""
    total = 0.0
    for r0 in range(0, ref.shape[0], rows):
        zr, zc = ref[r0 : r0 + rows].double(), cand[r0 : r0 + rows].double()
        p = torch.softmax(zr, -1)
        d = zr - zc
        u = d - (p * d).sum(-1, keepdim=True)
        a = (p * u).sum(-1)
        series = u * u / 2 * (1 - u / 3 + u * u / 12 - u**3 / 60)
        g = torch.where(u.abs() < 1e-3, series, torch.expm1(-u) + u)
        total += float((a + torch.log1p((p * g).sum(-1) - a)).clamp_min(0).sum())
    return total / ref.shape[0]


def compare(ref, ref_label, ref_argmax, cands, labels, step, lp_class, acc_class):
    """validate/run.py::_compare's loop over row blocks, for one eval set."""
    n = ref.shape[0]
    positions = torch.arange(n, device=ref.device)
    vs_ref = [acc_class() for _ in cands]
    vs_prev = [acc_class() for _ in cands[1:]]
    for r in (slice(r0, r0 + step) for r0 in range(0, n, step)):
        ref_lp, prev = lp_class(ref[r], argmax=ref_argmax[r]), None
        for i, lg in enumerate(cands):
            lp = lp_class(lg[r])
            vs_ref[i].update_logprobs(ref_lp, lp, labels[r], positions[r], ref_label[r])
            if prev is not None:
                vs_prev[i - 1].update_logprobs(prev, lp, labels[r], positions[r])
            prev = lp
    return [a.result() for a in vs_ref + vs_prev]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=8160)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    ap.add_argument(
        "--chunk", type=int, default=0, help="logits per row block of the new code (0: its default)"
    )
    ap.add_argument("--compact", action="store_true", help="the reference as the compact cache holds it")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    if args.chunk:
        metrics._CHUNK_ELEMENTS = args.chunk
    if args.threads:
        torch.set_num_threads(args.threads)
    data = eval_set(args.tokens, args.vocab, args.compact, args.device)
    gpu = torch.device(args.device).type == "cuda"
    old_step = max(1, (OLD_CHUNK_ELEMENTS_GPU if gpu else OLD_CHUNK_ELEMENTS) // args.vocab)
    new_step = metrics.rows_per_chunk(args.vocab, args.device)
    variants = {
        "old": (old_step, OldLogProbs, OldAccumulator),
        "old, new blocks": (new_step, OldLogProbs, OldAccumulator),
        "new": (new_step, metrics.LogProbs, MetricAccumulator),
    }
    times: dict[str, list[tuple[float, float, int]]] = {k: [] for k in variants}
    results = {}
    with torch.no_grad():
        for _ in range(args.repeats):  # interleaved, so that a busy moment hits every variant alike
            for name, (step, lp_class, acc_class) in variants.items():
                if gpu:
                    torch.cuda.synchronize()
                t0, c0 = time.perf_counter(), time.process_time()
                f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                results[name] = compare(*data, step, lp_class, acc_class)
                faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
                times[name].append((time.perf_counter() - t0, time.process_time() - c0, faults))
    where = torch.cuda.get_device_name() if gpu else f"CPU, torch threads {torch.get_num_threads()}"
    print(
        f"{args.tokens} tokens x vocab {args.vocab}, 1 reference{' (compact cache)' if args.compact else ''} + 4 "
        f"stages (7 comparisons), {where}, {args.repeats} repeats\n"
    )
    print(
        "| code | rows per block | wall s (min / median) | CPU s (min / median) | CPU vs old | page faults |"
    )
    print("|---|---|---|---|---|---|")
    base = min(c for _, c, _ in times["old"])
    for name, (step, _, _) in variants.items():
        wall, cpu = [t[0] for t in times[name]], [t[1] for t in times[name]]
        print(
            f"| {name} | {step} | {min(wall):.3f} / {statistics.median(wall):.3f} | "
            f"{min(cpu):.3f} / {statistics.median(cpu):.3f} | {base / min(cpu):.2f}x | "
            f"{int(statistics.median(t[2] for t in times[name]))} |"
        )
    old, new = results["old"], results["new"]
    worst = {}
    for o, n in zip(old, new, strict=True):
        for k in TOKEN_METRICS:
            scale = abs(o[k]) if k != "dp_mean" else max(abs(o[k]), o["dp_rms"])
            worst[k] = max(worst.get(k, 0.0), abs(n[k] - o[k]) / scale if scale else abs(n[k] - o[k]))
    print(
        "\nlargest relative difference new vs old over the 7 comparisons (dp_mean: relative to dp_rms; KL: the"
    )
    print("merged-FP32 comparisons differ by the old code's own error, see the table below):")
    print(", ".join(f"{k} {v:.1e}" for k, v in worst.items()))
    hist = sum(o["kl_hist"] != n["kl_hist"] for o, n in zip(old, new, strict=True))
    print(f"KL histograms that differ: {hist} of 7")
    ref, _, _, cands, _ = data
    pairs = [(ref, c) for c in cands] + list(zip(cands, cands[1:], strict=False))
    names = [f"ref-s{i + 1}" for i in range(4)] + [f"s{i + 1}-s{i + 2}" for i in range(3)]
    print("\n| comparison | KL mean, exact | old: relative error | new: relative error |\n|---|---|---|---|")
    for name, (r, c), o, n in zip(names, pairs, old, new, strict=True):
        ex = exact_kl_mean(r.cpu(), c.cpu())
        print(
            f"| {name} | {ex:.4e} | {abs(o['kl_mean'] - ex) / ex:.1e} | {abs(n['kl_mean'] - ex) / ex:.1e} |"
        )


if __name__ == "__main__":
    main()
