"""Streaming metrics that compare a candidate's next-token distributions with the reference's.

Pure math on logits: no model loading, no I/O. The caller feeds blocks of rows; we keep only a
handful of float64 scalars per token (never [tokens, vocab]), so an eval set of any size fits.

KL is KL(P_ref || P_cand) in nats per token, from float64 log-softmax: sum_v p_ref (log p_ref - log p_cand).
That sum cancels at first order (its terms are ~u, the log-prob differences, the result ~E_p[u^2] / 2), so the
rounding of each log p, ~1e-16 |log p|, leaves an absolute error of ~1e-15 in KL: nothing from KL ~1e-8 up
(1e-12 relative at KL 6e-5), but at the divergences of a merged FP32 model, whose logits differ from the
reference's by float rounding (relative ~1e-7, KL ~1e-13 .. 1e-11), up to ~40% of a token's KL at 1e-13 and
~1e-3 at 1e-11. Rows under _REFINE_BELOW = 1e-8 are therefore recomputed in a form where nothing cancels
(_exact_kl): with u = (log p_ref - log p_cand) - E_p[...], so that E_p[u] = 0 (the rounding of that mean moves
KL only by its product with KL), KL = log E_p[exp(-u)] = log1p(E_p[g(u)]), g(u) = exp(-u) - 1 + u >= 0: a sum
of non-negative terms, each within u^2/12 <= 1e-7 relative (u^2 (1/2 - u/6) where |u| <= 1e-3: ~1e-13 for a
merged FP32 model's u ~ 1e-6) or ~1e-16 / |u| (expm1(-u) + u) of its value, while the rounding of each log p
moves its u by only ~1e-16 / |u| of itself. KL is then exact to ~1e-9 relative however small, and 0 for
identical rows (tests/validate/test_metrics.py, against 40-digit arithmetic).
Label log-probs, dp and top-1 are the float64 log-softmax's, as before.

Cost: the float64 passes run on row blocks of 256K logits (rows_per_chunk), whose 2 MiB temporaries stay in a
CPU's caches and are reused by the allocator. The blocks of 4M logits used before had 32 MiB temporaries, which
glibc maps afresh for every pass: 200K-600K page faults per eval set of 8,160 tokens x 2,048 and about twice the
CPU time of the whole comparison step (bench/compare_speed.py). The refinement adds ~6 passes over the rows it
takes (typically those of one comparison in seven, a merged FP32 model's); the argmax comes from block maxima of
the logits, several times faster than torch.argmax's unvectorised scan over float64, and the same index.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from lorafast_export.errors import InputError

IGNORE_INDEX = -100
# Fixed, log-spaced KL histogram edges (1e-14 .. 10 nats, 3 bins per decade): the same bins for every
# stage and every report, so histograms can be overlaid and diffed. 1e-14 sits below FP32 merge rounding.
KL_HIST_EDGES: tuple[float, ...] = tuple(10.0 ** (k / 3) for k in range(-42, 4))
POSITION_BUCKETS = 32
_CHUNK_ELEMENTS = 1 << 18  # rows per float64 pass ~ 256K logits, 2 MiB per temporary
_CHUNK_ELEMENTS_GPU = 1 << 26  # on a GPU: ~512 MiB per temporary

# Names of the scalar results, one source of truth for gates and the report schema.
COMPARISON_METRICS: tuple[str, ...] = ("kl_mean", "kl_sem", "kl_median", "kl_p90", "kl_p99", "kl_max", "top1")
LABEL_METRICS: tuple[str, ...] = ("ppl_ref", "ppl", "ppl_ratio", "dp_mean", "dp_p1", "dp_p99", "dp_rms")
TOKEN_METRICS: tuple[str, ...] = COMPARISON_METRICS + LABEL_METRICS
GREEDY_METRICS: tuple[str, ...] = ("greedy_match", "first_divergence_mean")


# ----------------------------------------------------------------------------- per-token math

# Below this, the float64 log-softmax KL (absolute error ~1e-15, module docstring) is recomputed in the form
# where nothing cancels (_exact_kl): from here up its relative error is below ~1e-7.
_REFINE_BELOW = 1e-8
_ARGMAX_BLOCK = 64


def log_logprobs(logits: torch.Tensor) -> torch.Tensor:
    """[n, V] logits -> float64 log-probs, the form every comparison below works in."""
    return torch.log_softmax(logits.to(torch.float64), dim=-1)


def token_kl(logp_ref: torch.Tensor, logp_cand: torch.Tensor) -> torch.Tensor:
    """[n, V] float64 log-probs -> [n] KL(P_ref || P_cand); 0 * log 0 counts as 0, never NaN."""
    return _kl(LogProbs(logp_ref, normalized=True), logp_cand)


class LogProbs:
    """One model's float64 log-probs for a block of rows, with what comparing them needs (the probabilities,
    the argmax) computed on first use and kept: a model compared with several others (the reference with every
    stage, a stage with the reference and with the next stage) pays for each once, not once per comparison.

    logits: [n, V] logits (or float64 log-probs, normalized=True); argmax: the exact argmax when logits is a
    rounded copy (the compact reference cache)."""

    def __init__(self, logits: torch.Tensor, normalized: bool = False, argmax: torch.Tensor | None = None):
        self.z = logits
        self.logp = logits if normalized else log_logprobs(logits)
        self._p: torch.Tensor | None = None
        self._argmax = None if argmax is None else argmax.long()

    @property
    def vocab(self) -> int:
        return self.z.shape[-1]

    @property
    def p(self) -> torch.Tensor:
        if self._p is None:
            self._p = self.logp.exp()
        return self._p

    @property
    def argmax(self) -> torch.Tensor:
        """The first index of the row max: of the logits (the same as of their log-softmax, whose rounding
        keeps the order of distinct float32 values), which _row_max finds several times faster."""
        if self._argmax is None:
            exact = self.z.dtype in (torch.float32, torch.float16, torch.bfloat16)
            self._argmax = _row_max(self.z.float()) if exact else self.logp.argmax(-1)
        return self._argmax


def _row_max(z: torch.Tensor) -> torch.Tensor:
    """[n, V] -> [n] the first index of each row's max (what torch.argmax returns): the max of blocks of 64
    entries, then an argmax among the blocks and inside the first block that holds the row max; an argmax over
    the whole row does not vectorise."""
    n, vocab = z.shape
    b = _ARGMAX_BLOCK
    main = vocab - vocab % b
    if main < 2 * b:
        return z.argmax(-1)
    blocks = z[:, :main].unflatten(-1, (main // b, b))
    block_max = blocks.amax(-1)
    j = block_max.argmax(-1)
    inside = blocks.gather(1, j.view(n, 1, 1).expand(n, 1, b)).squeeze(1).argmax(-1)
    index = j * b + inside
    if main < vocab:  # the tail that does not fill a block: only a strictly larger max moves the index
        m = block_max.gather(-1, j.unsqueeze(-1)).squeeze(-1)
        tail_max, tail_index = z[:, main:].amax(-1), z[:, main:].argmax(-1)
        later = (tail_max > m) | (torch.isnan(tail_max) & ~torch.isnan(m))
        index = torch.where(later, tail_index + main, index)
    return index


def _kl(ref: LogProbs, logp_cand: torch.Tensor) -> torch.Tensor:
    """sum_v p_ref (log p_ref - log p_cand) per row, terms where p_ref is not > 0 counted as 0; rows below
    _REFINE_BELOW (nearly identical distributions) recomputed without cancellation by _exact_kl.

    The same values as torch.where(p_ref > 0, p_ref * (logp_ref - logp_cand), 0) summed in the same order, in
    two in-place passes over one temporary: a term with p_ref == 0 is already 0 unless its log-prob difference
    is infinite (0 * inf = NaN), so only rows whose sum is NaN are summed again through the mask."""
    terms = torch.sub(ref.logp, logp_cand)
    kl = terms.mul_(ref.p).sum(dim=-1)
    bad = torch.isnan(kl)
    if bool(bad.any()):
        rows = bad.nonzero().squeeze(-1)
        p, lr = ref.p[rows], ref.logp[rows]
        kl[rows] = torch.where(p > 0, p * (lr - logp_cand[rows]), torch.zeros_like(p)).sum(dim=-1)
    small = kl < _REFINE_BELOW
    if bool(small.all()):  # a merged FP32 model: every row, no gathered copies
        diff = torch.sub(ref.logp, logp_cand, out=terms)
        kl = _exact_kl(diff.masked_fill_(ref.p == 0, 0.0) if bool(bad.any()) else diff, kl, ref.p)
    elif bool(small.any()):
        rows = small.nonzero().squeeze(-1)
        p, diff = ref.p[rows], ref.logp[rows] - logp_cand[rows]
        kl[rows] = _exact_kl(diff.masked_fill_(p == 0, 0.0) if bool(bad.any()) else diff, kl[rows], p)
    return kl.clamp_min(0.0)  # rounding can leave -1e-18 for identical rows


def _exact_kl(diff: torch.Tensor, centre: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """KL(P_ref || P_cand) [n] from diff = log p_ref - log p_cand [n, V] (float64; 0 where p is 0), centre =
    E_p[diff] [n] as summed and p = P_ref, in a form where nothing cancels (module docstring): u = diff - centre
    (E_p[u] = 0 up to the rounding of that sum, which moves KL by its product with KL), KL = log E_p[exp(-u)] =
    log1p(E_p[g(u)]), g(u) = exp(-u) - 1 + u >= 0, as u^2 (1/2 - u/6) in rows whose |u| <= 1e-3 (relative
    truncation u^2/12 <= 1e-7), else as expm1(-u) + u (relative error ~2^-52 / |u|). Where that is not finite
    (infinite logits) the value stays centre. diff is overwritten."""
    u = diff.sub_(centre.unsqueeze(-1))
    series = torch.maximum(u.amax(-1), u.amin(-1).neg_()) <= 1e-3
    if bool(series.all()):  # 2 g
        g2 = torch.mul(u, u)
        g2.addcmul_(g2, u, value=-1.0 / 3.0)
    else:
        g2 = torch.neg(u).expm1_().add_(u).mul_(2.0)
        if bool(series.any()):
            rows = series.nonzero().squeeze(-1)
            s = u[rows] * u[rows]
            g2[rows] = s.addcmul_(s, u[rows], value=-1.0 / 3.0)
    exact = torch.log1p(g2.mul_(p).sum(-1).mul_(0.5))
    return torch.where(torch.isfinite(exact), exact, centre)


def token_stats(
    ref_logits: torch.Tensor,
    cand_logits: torch.Tensor,
    labels: torch.Tensor,
    ref_label_logp: torch.Tensor | None = None,
    ref_argmax: torch.Tensor | None = None,
    normalized: bool = False,
) -> dict[str, np.ndarray]:
    """Per-token scalars for rows that all carry a label: [n, V], [n, V], [n] -> {name: [n]}.

    ref_label_logp / ref_argmax: the reference's exact label log-prob and argmax, when ref_logits is a rounded
    copy (the compact reference cache): perplexity and top-1 then stay exact, only the KL sees the rounding.
    normalized: both inputs are already float64 log-probs (log_logprobs of them)."""
    ref = LogProbs(ref_logits, normalized, ref_argmax)
    return compare_logprobs(ref, LogProbs(cand_logits, normalized), labels, ref_label_logp)


def compare_logprobs(
    ref: LogProbs, cand: LogProbs, labels: torch.Tensor, ref_label_logp: torch.Tensor | None = None
) -> dict[str, np.ndarray]:
    """token_stats of two LogProbs of the same rows (all labelled), reusing what each has computed."""
    idx = labels.long().unsqueeze(-1)
    lr = ref.logp.gather(-1, idx).squeeze(-1) if ref_label_logp is None else ref_label_logp.to(torch.float64)
    lc = cand.logp.gather(-1, idx).squeeze(-1)
    stats = {
        "kl": _kl(ref, cand.logp),
        "top1": (ref.argmax == cand.argmax).to(torch.float64),
        "logp_ref": lr,
        "logp_cand": lc,
        "p_ref": lr.exp(),
        "p_cand": lc.exp(),
    }
    return {k: v.detach().cpu().numpy() for k, v in stats.items()}


def _label_logp(logits: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """[n, V], [n] -> [n] float64 log p(label)."""
    logp = log_logprobs(logits)
    return logp.gather(-1, labels.long().unsqueeze(-1)).squeeze(-1).detach().cpu().numpy()


# ----------------------------------------------------------------------------- summaries (pure numpy)


def kl_summary(kl: np.ndarray) -> dict[str, float]:
    """Mean, standard error of the mean and tail quantiles of per-token KL."""
    n = kl.size
    p50, p90, p99 = np.percentile(kl, [50, 90, 99])
    sem = float(np.std(kl, ddof=1) / math.sqrt(n)) if n > 1 else math.nan
    return {
        "kl_mean": float(np.mean(kl)),
        "kl_sem": sem,
        "kl_median": float(p50),
        "kl_p90": float(p90),
        "kl_p99": float(p99),
        "kl_max": float(np.max(kl)),
    }


def label_summary(logp_ref: np.ndarray, logp_cand: np.ndarray, p_ref: np.ndarray, p_cand: np.ndarray) -> dict:
    """Perplexities on the labels and the shift of the correct token's probability (Δp = p_cand - p_ref)."""
    dp = p_cand - p_ref
    dp_p1, dp_p99 = np.percentile(dp, [1, 99])
    return {
        "ppl_ref": math.exp(-float(np.mean(logp_ref))),
        "ppl": math.exp(-float(np.mean(logp_cand))),
        "ppl_ratio": math.exp(float(np.mean(logp_ref - logp_cand))),
        "dp_mean": float(np.mean(dp)),
        "dp_p1": float(dp_p1),
        "dp_p99": float(dp_p99),
        "dp_rms": float(np.sqrt(np.mean(dp * dp))),
    }


def nice_width(raw: float) -> int:
    """Smallest of 1, 2, 5, 10, 20, 50, ... that is >= raw: bucket widths that read well on an axis."""
    width, i = 1, 0
    while width < raw:
        width = round(width * (2, 2.5, 2)[i % 3])
        i += 1
    return width


def kl_by_position(kl: np.ndarray, positions: np.ndarray, buckets: int = POSITION_BUCKETS) -> list[dict]:
    """Mean KL per bucket of positions: [{start, end (inclusive), kl_mean, tokens}] for non-empty buckets."""
    width = nice_width((int(positions.max()) + 1) / buckets)
    bucket = positions // width
    counts = np.bincount(bucket)
    sums = np.bincount(bucket, weights=kl)
    return [
        {
            "start": int(b * width),
            "end": int(b * width + width - 1),
            "kl_mean": float(sums[b] / c),
            "tokens": int(c),
        }
        for b, c in enumerate(counts)
        if c > 0
    ]


def kl_histogram(kl: np.ndarray, edges: Sequence[float] = KL_HIST_EDGES) -> dict[str, Any]:
    """Per-token KL counted in fixed log-spaced bins, plus what falls below / above them (0, inf included)."""
    lo, hi = edges[0], edges[-1]
    inside = kl[(kl >= lo) & (kl < hi)]
    counts, _ = np.histogram(inside, bins=np.asarray(edges))
    return {
        "edges": list(edges),
        "counts": [int(c) for c in counts],
        "underflow": int(np.sum(kl < lo)),
        "overflow": int(np.sum(kl >= hi)),
    }


# ----------------------------------------------------------------------------- input checks


def _flatten_block(
    ref: torch.Tensor | None, cand: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor | None
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Accept [n, V] or [batch, seq, V] logits; return 2-D logits, 1-D labels and positions, all checked."""
    if cand.dim() not in (2, 3):
        raise InputError(
            f"logits: expected [tokens, vocab] or [batch, seq, vocab], got shape {tuple(cand.shape)}"
        )
    if ref is not None and ref.shape != cand.shape:
        raise InputError(
            f"ref_logits {tuple(ref.shape)} and cand_logits {tuple(cand.shape)} differ in shape; "
            "both must come from the same token ids (check the tokenizer and the vocab padding of the target)"
        )
    lead = tuple(cand.shape[:-1])
    if tuple(labels.shape) != lead:
        raise InputError(f"labels: expected shape {lead} to match the logits, got {tuple(labels.shape)}")
    if positions is None:  # one sequence per row of a 3-D block, or the block itself as one sequence
        positions = torch.arange(lead[-1]).expand(lead)
    elif tuple(positions.shape) != lead or bool((positions < 0).any()):
        raise InputError(
            f"positions: expected non-negative token indices of shape {lead} to match the logits, "
            f"got shape {tuple(positions.shape)}"
        )
    vocab = cand.shape[-1]
    flat = (lambda t: t.reshape(-1, vocab)) if cand.dim() == 3 else (lambda t: t)
    return (None if ref is None else flat(ref)), flat(cand), labels.reshape(-1), positions.reshape(-1)


def _labelled_rows(labels: torch.Tensor, vocab: int) -> torch.Tensor:
    """Indices of rows whose label is not IGNORE_INDEX; labels outside [0, vocab) are an input error."""
    keep = labels != IGNORE_INDEX
    bad = keep & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        raise InputError(
            f"labels: {int(bad.sum())} label(s) outside [0, {vocab}) (e.g. {int(labels[bad][0])}); "
            f"use {IGNORE_INDEX} for positions to ignore; the labels must come from the model's tokenizer"
        )
    return keep.nonzero().squeeze(-1)


def rows_per_chunk(vocab: int, device="cpu") -> int:
    """Rows of one float64 pass over [rows, vocab]: ~2 MiB per temporary on a CPU (they stay in its caches, and
    the allocator reuses them: 32 MiB ones were mapped and page-faulted afresh on every pass), ~512 MiB on a GPU
    (at 8B, a whole 256-token block per pass: a few large kernels instead of many small ones and one host copy of
    the scalars per pass; each row's values are computed row by row either way)."""
    elements = _CHUNK_ELEMENTS_GPU if torch.device(device).type == "cuda" else _CHUNK_ELEMENTS
    return max(1, elements // max(vocab, 1))


def _take(t: torch.Tensor, rows: torch.Tensor, device: torch.device) -> torch.Tensor:
    """t[rows] moved to `device`: reference and candidate logits may live on different devices."""
    return t[rows.to(t.device)].to(device)


# ----------------------------------------------------------------------------- accumulators


class MetricAccumulator:
    """Streams blocks of (reference, candidate) logits and summarises how far the candidate drifted.

    Tokens whose label is IGNORE_INDEX (-100) are left out of every statistic (padding, prompt tokens).
    `positions` (token index inside its sequence) only feeds the KL-by-position plot; when omitted, each row
    of a [batch, seq, V] block, or a whole [n, V] block, is taken to start at position 0.
    """

    _FIELDS = ("kl", "top1", "logp_ref", "logp_cand", "p_ref", "p_cand", "position")

    def __init__(self) -> None:
        self._parts: dict[str, list[np.ndarray]] = {k: [] for k in self._FIELDS}

    @property
    def tokens(self) -> int:
        return sum(a.size for a in self._parts["kl"])

    def update(
        self,
        ref_logits: torch.Tensor,
        cand_logits: torch.Tensor,
        labels: torch.Tensor,
        positions: torch.Tensor | None = None,
        ref_label_logp: torch.Tensor | None = None,
        ref_argmax: torch.Tensor | None = None,
        normalized: bool = False,
    ) -> None:
        """ref_label_logp / ref_argmax (flat, one per row), normalized (log-probs given): see token_stats."""
        ref, cand, labels, positions = _flatten_block(ref_logits, cand_logits, labels, positions)
        rows = _labelled_rows(labels, cand.shape[-1])
        step, dev = rows_per_chunk(cand.shape[-1]), cand.device
        for start in range(0, rows.numel(), step):
            sel = rows[start : start + step]
            exact = [
                None if t is None else _take(t.reshape(-1), sel, dev) for t in (ref_label_logp, ref_argmax)
            ]
            stats = token_stats(
                _take(ref, sel, dev), _take(cand, sel, dev), _take(labels, sel, dev), *exact, normalized
            )
            self._add(stats, _take(positions, sel, torch.device("cpu")))

    def update_logprobs(
        self,
        ref: LogProbs,
        cand: LogProbs,
        labels: torch.Tensor,
        positions: torch.Tensor,
        ref_label_logp: torch.Tensor | None = None,
    ) -> None:
        """Rows that all carry a label ([n] labels and positions), given as LogProbs: the probabilities and
        argmax each one computes stay with it for its other comparisons (validate/run.py compares the
        reference with every stage and every stage with the next one)."""
        if _labelled_rows(labels, ref.vocab).numel() != labels.numel():
            raise InputError("update_logprobs: every row needs a label (use update() to skip -100 labels)")
        self._add(compare_logprobs(ref, cand, labels, ref_label_logp), positions.cpu())

    def _add(self, stats: dict[str, np.ndarray], positions: torch.Tensor) -> None:
        for name, values in stats.items():
            self._parts[name].append(values)
        self._parts["position"].append(positions.numpy().astype(np.int64))

    def result(self) -> dict[str, Any]:
        """Scalar metrics (TOKEN_METRICS), `tokens`, and plot data `kl_by_position`, `kl_hist`."""
        if self.tokens == 0:
            raise InputError(
                "eval set: no labelled tokens were compared (all labels are -100 or no block was given); "
                "check the eval data and the label masking"
            )
        s = {k: np.concatenate(v) for k, v in self._parts.items()}
        return {
            **kl_summary(s["kl"]),
            "top1": float(np.mean(s["top1"])),
            **label_summary(s["logp_ref"], s["logp_cand"], s["p_ref"], s["p_cand"]),
            "tokens": int(s["kl"].size),
            "kl_by_position": kl_by_position(s["kl"], s["position"]),
            "kl_hist": kl_histogram(s["kl"]),
        }


class PerplexityAccumulator:
    """Perplexity of one model on labelled tokens, no reference needed (the bare base model)."""

    def __init__(self) -> None:
        self._nll = 0.0
        self._tokens = 0

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        _, logits, labels, _ = _flatten_block(None, logits, labels, None)
        rows = _labelled_rows(labels, logits.shape[-1])
        step = rows_per_chunk(logits.shape[-1])
        for start in range(0, rows.numel(), step):
            sel = rows[start : start + step]
            self._nll -= float(
                np.sum(_label_logp(_take(logits, sel, logits.device), _take(labels, sel, logits.device)))
            )
            self._tokens += int(sel.numel())

    def update_label_logp(self, label_logp: torch.Tensor) -> None:
        """Already computed log p(label) of labelled rows (the reference cache stores them)."""
        self._nll -= float(label_logp.double().sum())
        self._tokens += int(label_logp.numel())

    @property
    def ppl(self) -> float:
        if self._tokens == 0:
            raise InputError(
                "eval set: no labelled tokens for perplexity (all labels are -100 or no block was given)"
            )
        return math.exp(self._nll / self._tokens)

    def result(self) -> dict[str, float | int]:
        return {"ppl": self.ppl, "tokens": self._tokens}


# ----------------------------------------------------------------------------- derived metrics


def adapter_gain_retained(
    ppl_base: float, ppl_ref: float, ppl_cand: float, min_rel_change: float = 1e-3
) -> float | None:
    """Share of the adapter's perplexity change that survives in the candidate: (base - cand) / (base - ref).

    1.0 = all of it, 0.0 = none (the export acts like the bare base: adapter dropped), <0 = worse than base.
    Returns None when the adapter itself moved perplexity by less than `min_rel_change` (relative to the base)
    on this eval set: the ratio would be noise divided by ~0, so it is undefined, not a failure.
    """
    for name, value in (("ppl_base", ppl_base), ("ppl_ref", ppl_ref)):
        if not (value > 0 and math.isfinite(value)):
            raise InputError(f"{name}: perplexity must be a finite positive number, got {value!r}")
    gain = ppl_base - ppl_ref
    if abs(gain) <= min_rel_change * ppl_base:
        return None
    return (ppl_base - ppl_cand) / gain


def first_divergence(ref: Sequence[int], cand: Sequence[int]) -> int:
    """Index of the first differing token; the shorter length when one is a prefix of the other."""
    for i, (a, b) in enumerate(zip(ref, cand, strict=False)):
        if a != b:
            return i
    return min(len(ref), len(cand)) if len(ref) != len(cand) else len(ref)


def greedy_agreement(
    ref_tokens: Sequence[Sequence[int]], cand_tokens: Sequence[Sequence[int]]
) -> dict[str, Any]:
    """Compare greedy continuations (new tokens only) prompt by prompt.

    greedy_match: share of prompts whose new tokens equal the reference's exactly.
    first_divergence_mean: mean index of the first differing new token (M, the length, when none differs).
    """
    if len(ref_tokens) != len(cand_tokens) or not ref_tokens:
        raise InputError(
            f"greedy tokens: need the same non-zero number of prompts, got {len(ref_tokens)} reference and "
            f"{len(cand_tokens)} candidate continuations"
        )
    per_prompt = []
    for ref, cand in zip(ref_tokens, cand_tokens, strict=True):
        div = first_divergence(ref, cand)
        length = max(len(ref), len(cand))
        per_prompt.append(
            {"match": div == length and len(ref) == len(cand), "first_divergence": div, "tokens": length}
        )
    return {
        "greedy_match": sum(p["match"] for p in per_prompt) / len(per_prompt),
        "first_divergence_mean": sum(p["first_divergence"] for p in per_prompt) / len(per_prompt),
        "per_prompt": per_prompt,
    }
