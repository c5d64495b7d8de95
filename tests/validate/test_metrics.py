"""Streaming metrics against values computed by hand with math.log on tiny logits."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lorafast_export.errors import InputError
from lorafast_export.validate.metrics import (
    IGNORE_INDEX,
    KL_HIST_EDGES,
    TOKEN_METRICS,
    MetricAccumulator,
    PerplexityAccumulator,
    adapter_gain_retained,
    first_divergence,
    greedy_agreement,
    kl_by_position,
    nice_width,
)

REF = [[1.0, 2.0, 3.0], [0.5, -1.0, 0.0], [2.0, 2.0, -3.0]]
CAND = [[1.2, 1.9, 2.7], [0.0, -1.0, 0.5], [2.5, 1.0, -3.0]]
LABELS = [2, 0, 1]


def softmax(row: list[float]) -> list[float]:
    z = sum(math.exp(x) for x in row)
    return [math.exp(x) / z for x in row]


def hand_kl(p_row: list[float], q_row: list[float]) -> float:
    p, q = softmax(p_row), softmax(q_row)
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q, strict=True))


def run(ref, cand, labels, blocks: int = 1, positions=None) -> dict:
    acc = MetricAccumulator()
    ref, cand = torch.tensor(ref, dtype=torch.float64), torch.tensor(cand, dtype=torch.float64)
    labels = torch.tensor(labels)
    pos = None if positions is None else torch.tensor(positions)
    for idx in np.array_split(np.arange(len(labels)), blocks):
        idx = torch.from_numpy(idx)
        acc.update(ref[idx], cand[idx], labels[idx], None if pos is None else pos[idx])
    return acc.result()


def test_matches_hand_computation():
    r = run(REF, CAND, LABELS, positions=[0, 1, 2])
    kls = [hand_kl(p, q) for p, q in zip(REF, CAND, strict=True)]
    p_ref = [softmax(row)[y] for row, y in zip(REF, LABELS, strict=True)]
    p_cand = [softmax(row)[y] for row, y in zip(CAND, LABELS, strict=True)]
    mean = sum(kls) / 3
    sem = math.sqrt(sum((k - mean) ** 2 for k in kls) / 2) / math.sqrt(3)
    assert r["kl_mean"] == pytest.approx(mean, rel=1e-12)
    assert r["kl_sem"] == pytest.approx(sem, rel=1e-12)
    assert r["kl_max"] == pytest.approx(max(kls), rel=1e-12)
    assert r["kl_median"] == pytest.approx(sorted(kls)[1], rel=1e-12)
    # argmax: ref (2, 0, 0/1 tie -> 0), cand (2, 2, 0): rows 0 and 2 agree
    assert r["top1"] == pytest.approx(2 / 3)
    ppl_ref = math.exp(-sum(math.log(p) for p in p_ref) / 3)
    ppl = math.exp(-sum(math.log(p) for p in p_cand) / 3)
    assert r["ppl_ref"] == pytest.approx(ppl_ref, rel=1e-12)
    assert r["ppl"] == pytest.approx(ppl, rel=1e-12)
    assert r["ppl_ratio"] == pytest.approx(ppl / ppl_ref, rel=1e-12)
    dp = [c - p for c, p in zip(p_cand, p_ref, strict=True)]
    assert r["dp_mean"] == pytest.approx(sum(dp) / 3, rel=1e-12)
    assert r["dp_rms"] == pytest.approx(math.sqrt(sum(d * d for d in dp) / 3), rel=1e-12)
    assert r["tokens"] == 3
    assert set(TOKEN_METRICS) <= set(r)


def test_small_kl_is_exact_in_float64():
    ref = torch.tensor([[0.0, 1.0, 2.0]], dtype=torch.float64)
    eps = 1e-6
    cand = ref + torch.tensor([[eps, 0.0, 0.0]], dtype=torch.float64)
    r = run(ref.tolist(), cand.tolist(), [0])
    # second order: KL ~ 0.5 * Var_p(delta) = 0.5 * eps^2 * p0 * (1 - p0)
    p0 = softmax([0.0, 1.0, 2.0])[0]
    assert r["kl_mean"] == pytest.approx(0.5 * eps**2 * p0 * (1 - p0), rel=1e-4)


def test_streaming_blocks_equal_one_block():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(37, 11, generator=g)
    cand = ref + 0.3 * torch.randn(37, 11, generator=g)
    labels = torch.randint(11, (37,), generator=g)
    labels[5] = IGNORE_INDEX
    pos = torch.arange(37) % 13
    one = run(ref.tolist(), cand.tolist(), labels.tolist(), 1, pos.tolist())
    many = run(ref.tolist(), cand.tolist(), labels.tolist(), 5, pos.tolist())
    for key in TOKEN_METRICS:
        assert many[key] == pytest.approx(one[key], rel=1e-12, abs=1e-15), key
    assert many["kl_by_position"] == one["kl_by_position"]
    assert many["kl_hist"] == one["kl_hist"]
    assert one["tokens"] == 36


def test_identical_logits():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 9, 17, generator=g)  # [batch, seq, vocab] is accepted too
    labels = torch.randint(17, (2, 9), generator=g)
    acc = MetricAccumulator()
    acc.update(logits, logits.clone(), labels)
    r = acc.result()
    assert r["kl_mean"] == 0.0 and r["kl_max"] == 0.0
    assert r["top1"] == 1.0
    assert r["ppl_ratio"] == 1.0
    assert r["dp_mean"] == 0.0 and r["dp_rms"] == 0.0
    assert r["kl_hist"]["underflow"] == 18 and sum(r["kl_hist"]["counts"]) == 0


def test_ignored_labels_are_left_out():
    r_all = run(REF[:2], CAND[:2], LABELS[:2])
    r_masked = run(REF, CAND, LABELS[:2] + [IGNORE_INDEX])
    assert r_masked["tokens"] == 2
    assert r_masked["kl_mean"] == pytest.approx(r_all["kl_mean"], rel=1e-15)


def test_zero_probability_in_reference_does_not_give_nan():
    ref = [[0.0, float("-inf"), 1.0]]
    cand = [[0.0, 0.5, 1.0]]
    r = run(ref, cand, [0])
    assert math.isfinite(r["kl_mean"]) and r["kl_mean"] > 0


def test_bad_inputs_name_the_field():
    acc = MetricAccumulator()
    with pytest.raises(InputError, match="differ in shape"):
        acc.update(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(InputError, match="labels: expected shape"):
        acc.update(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(InputError, match=r"outside \[0, 3\)"):
        acc.update(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([0, 7]))
    with pytest.raises(InputError, match="no labelled tokens"):
        acc.result()


def test_kl_by_position_buckets():
    kl = np.array([1.0, 3.0, 5.0, 7.0])
    buckets = kl_by_position(kl, np.array([0, 1, 2, 3]), buckets=2)
    assert buckets == [
        {"start": 0, "end": 1, "kl_mean": 2.0, "tokens": 2},
        {"start": 2, "end": 3, "kl_mean": 6.0, "tokens": 2},
    ]
    assert [nice_width(x) for x in (0.3, 1, 3, 7, 12, 40)] == [1, 1, 5, 10, 20, 50]


def test_histogram_edges_are_log_spaced_and_shared():
    r = run(REF, CAND, LABELS)
    ratios = np.diff(np.log10(KL_HIST_EDGES))
    assert np.allclose(ratios, ratios[0])
    h = r["kl_hist"]
    assert h["edges"] == list(KL_HIST_EDGES)
    assert sum(h["counts"]) + h["underflow"] + h["overflow"] == 3


def test_perplexity_accumulator():
    acc = PerplexityAccumulator()
    ref = torch.tensor(REF, dtype=torch.float64)
    acc.update(ref[:2], torch.tensor(LABELS[:2]))
    acc.update(ref[2:], torch.tensor([LABELS[2]]))
    expected = math.exp(-sum(math.log(softmax(r)[y]) for r, y in zip(REF, LABELS, strict=True)) / 3)
    assert acc.ppl == pytest.approx(expected, rel=1e-12)
    assert acc.result() == {"ppl": acc.ppl, "tokens": 3}
    assert acc.ppl == pytest.approx(run(REF, CAND, LABELS)["ppl_ref"], rel=1e-12)


def test_adapter_gain_retained():
    assert adapter_gain_retained(10.0, 6.0, 6.0) == pytest.approx(1.0)
    assert adapter_gain_retained(10.0, 6.0, 7.0) == pytest.approx(0.75)
    assert adapter_gain_retained(10.0, 6.0, 10.0) == pytest.approx(0.0)  # adapter dropped by the export
    assert adapter_gain_retained(10.0, 6.0, 11.0) == pytest.approx(-0.25)  # worse than the bare base
    assert adapter_gain_retained(10.0, 9.9999, 9.0) is None  # adapter did not move ppl: undefined
    with pytest.raises(InputError, match="ppl_base"):
        adapter_gain_retained(0.0, 6.0, 6.0)


def test_dropped_adapter_on_logits_gives_gain_near_zero():
    g = torch.Generator().manual_seed(2)
    base = torch.randn(64, 20, generator=g)
    labels = torch.randint(20, (64,), generator=g)
    ref = base + 2.0 * torch.nn.functional.one_hot(labels, 20)
    ppl_base = PerplexityAccumulator()
    ppl_base.update(base, labels)
    acc = MetricAccumulator()
    acc.update(ref, base + 1e-4 * torch.randn(64, 20, generator=g), labels)  # "artifact" lost the adapter
    r = acc.result()
    gain = adapter_gain_retained(ppl_base.ppl, r["ppl_ref"], r["ppl"])
    assert gain == pytest.approx(0.0, abs=1e-3)


def test_greedy_agreement():
    ref = [[1, 2, 3, 4], [5, 6, 7, 8], [1, 1, 1, 1]]
    cand = [[1, 2, 3, 4], [5, 6, 0, 0], [2, 1, 1, 1]]
    r = greedy_agreement(ref, cand)
    assert r["greedy_match"] == pytest.approx(1 / 3)
    assert r["first_divergence_mean"] == pytest.approx((4 + 2 + 0) / 3)
    assert [p["first_divergence"] for p in r["per_prompt"]] == [4, 2, 0]
    assert first_divergence([1, 2], [1, 2, 3]) == 2  # early EOS in one of them
    assert greedy_agreement([[1, 2]], [[1, 2, 3]])["greedy_match"] == 0.0
    with pytest.raises(InputError, match="same non-zero number of prompts"):
        greedy_agreement([[1]], [])


def test_chunking_inside_one_update_changes_nothing(monkeypatch):
    import lorafast_export.validate.metrics as metrics

    g = torch.Generator().manual_seed(3)
    ref = torch.randn(4, 10, 7, generator=g)
    cand = ref + 0.2 * torch.randn(4, 10, 7, generator=g)
    labels = torch.randint(7, (4, 10), generator=g)
    whole = MetricAccumulator()
    whole.update(ref, cand, labels)
    monkeypatch.setattr(metrics, "_CHUNK_ELEMENTS", 7 * 3)  # 3 rows per float64 pass
    chunked = MetricAccumulator()
    chunked.update(ref, cand, labels)
    a, b = whole.result(), chunked.result()
    assert all(a[k] == pytest.approx(b[k], rel=1e-12, abs=1e-15) for k in TOKEN_METRICS)
    assert a["kl_by_position"] == b["kl_by_position"]


def test_negative_positions_are_rejected():
    with pytest.raises(InputError, match="positions: expected non-negative"):
        MetricAccumulator().update(
            torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([0, 1]), torch.tensor([0, -1])
        )


# ----------------------------------------------------------------------------- float32 logits against exact values


def exact_stats(ref: torch.Tensor, cand: torch.Tensor, labels: torch.Tensor) -> dict[str, np.ndarray]:
    """KL, log p_ref(y), log p_cand(y) and dp of float32 logits, computed independently of metrics.py: float64
    from the logits (delta = z_ref - z_cand exact), in the form where nothing cancels (g = exp(-u) - 1 + u by
    its series or expm1); exact to ~1e-15 relative, checked against 40-digit arithmetic in
    test_exact_stats_against_mpmath. (A plain float64 sum p (log p - log q) is not: test_unrefined_sum_...)"""
    zr, zc = ref.double(), cand.double()
    lp = torch.log_softmax(zr, -1)
    p = lp.exp()
    d = zr - zc
    u = d - (p * d).sum(-1, keepdim=True)
    a = (p * u).sum(-1)
    series = u * u / 2 * (1 - u / 3 + u * u / 12 - u**3 / 60)
    g = torch.where(u.abs() < 1e-3, series, torch.expm1(-u) + u)
    lse = torch.log1p((p * g).sum(-1) - a)
    idx = labels[:, None]
    dlogp = -(u.gather(-1, idx)[:, 0] + lse)
    lr = lp.gather(-1, idx)[:, 0]
    out = {
        "kl": (a + lse).clamp_min(0),
        "logp_ref": lr,
        "logp_cand": lr + dlogp,
        "dp": lr.exp() * torch.expm1(dlogp),
    }
    return {k: v.numpy() for k, v in out.items()}


def stats_of(ref, cand, labels, **kw) -> dict[str, np.ndarray]:
    from lorafast_export.validate.metrics import LogProbs, compare_logprobs

    s = compare_logprobs(LogProbs(ref, argmax=kw.get("argmax")), LogProbs(cand), labels, kw.get("label_logp"))
    return {**s, "dp": s["p_cand"] - s["p_ref"]}


def llm_like(rows: int, vocab: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 2.5 * torch.randn(rows, vocab, generator=g) + 8.0 * (
        torch.rand(rows, vocab, generator=g) < 2 / vocab
    )


def perturbed(z: torch.Tensor, seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(reference, candidate) float32 logits: identical rows, relative noise 1e-7 (a merged FP32 model) .. 1,
    absolute noise (quantization-like), and per-row constant shifts of 1e4 on either side."""
    g = torch.Generator().manual_seed(seed)
    noise = lambda: torch.randn(z.shape, generator=g)  # noqa: E731
    cases = {"identical": (z, z.clone())}
    for eps in (1e-7, 1e-6, 1e-3, 1.0):
        cases[f"relative {eps:g}"] = (z, z * (1 + eps * noise()))
    cases["absolute 0.2"] = (z, z + 0.2 * noise())
    cases["reference + 1e4"] = (z + 1e4, z * (1 + 1e-6 * noise()))
    cases["candidate - 1e4"] = (z, z * (1 + 1e-3 * noise()) - 1e4)
    cases["both + 1e4"] = (z + 1e4, (z + 1e4) * (1 + 1e-7 * noise()))
    return cases


def assert_close_to_exact(new: dict, ex: dict, case: str) -> None:
    kl, kl_new = ex["kl"], new["kl"]
    big = kl >= 1e-15
    assert np.all(np.abs(kl_new - kl)[big] <= 1e-4 * kl[big]), (case, "KL >= 1e-15")
    assert np.all(np.abs(kl_new - kl)[~big] <= 1e-18), (case, "KL < 1e-15")
    large = kl >= 1e-6
    assert np.all(np.abs(kl_new - kl)[large] <= 1e-6 * kl[large]), (case, "KL >= 1e-6")
    for k in ("logp_ref", "logp_cand"):
        assert np.all(np.abs(new[k] - ex[k]) <= 1e-6 * np.abs(ex[k]) + 1e-15), (case, k)
    # dp = p_ref (exp(dlogp) - 1) per token, relative 1e-6 of itself or of p_ref times dlogp's typical size in
    # the eval set (a token whose dp is ~0 has no relative precision to keep)
    assert_dp_close(new, ex, case)


def assert_dp_close(new: dict, ex: dict, case: str) -> None:
    dlogp = ex["logp_cand"] - ex["logp_ref"]
    scale = np.exp(ex["logp_ref"]) * np.sqrt(np.mean(dlogp**2))
    assert np.all(np.abs(new["dp"] - ex["dp"]) <= 1e-6 * (np.abs(ex["dp"]) + scale)), (case, "dp")


@pytest.mark.parametrize(("vocab", "rows"), [(2048, 256), (128256, 6)])
def test_metrics_of_float32_logits_match_exact(vocab, rows):
    z = llm_like(rows, vocab, seed=vocab)
    labels = torch.randint(vocab, (rows,), generator=torch.Generator().manual_seed(1))
    for case, (ref, cand) in perturbed(z, seed=2).items():
        new, ex = stats_of(ref, cand, labels), exact_stats(ref, cand, labels)
        assert_close_to_exact(new, ex, case)
        old = stats_of(ref.double(), cand.double(), labels)  # the float64 log-softmax path
        assert np.array_equal(new["top1"], old["top1"]), case
        if case == "identical":
            assert np.all(new["kl"] == 0.0) and np.all(new["dp"] == 0.0)
        if case in ("relative 1e-07", "relative 1e-06"):  # measured, not rounded away (1e-13 .. 1e-11)
            assert np.all(new["kl"] > 1e-15), case


def test_exact_stats_against_mpmath():
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 40
    z = llm_like(3, 512, seed=5)
    labels = torch.tensor([3, 100, 511])
    for case, (ref, cand) in perturbed(z, seed=6).items():
        ex = exact_stats(ref, cand, labels)
        for i in range(3):
            zr = [mpmath.mpf(float(x)) for x in ref[i]]
            zc = [mpmath.mpf(float(x)) for x in cand[i]]
            lr = mpmath.log(mpmath.fsum(mpmath.exp(x) for x in zr))
            lc = mpmath.log(mpmath.fsum(mpmath.exp(x) for x in zc))
            kl = mpmath.fsum(mpmath.exp(x - lr) * ((x - lr) - (y - lc)) for x, y in zip(zr, zc, strict=True))
            y = int(labels[i])
            dp = mpmath.exp(zc[y] - lc) - mpmath.exp(zr[y] - lr)
            assert float(abs(ex["kl"][i] - kl)) <= 1e-12 * float(kl) + 1e-30, case
            assert float(abs(ex["dp"][i] - dp)) <= 1e-12 * float(abs(dp)) + 1e-30, case


def test_infinite_logits():
    g = torch.Generator().manual_seed(7)
    z = llm_like(4, 300, seed=7)
    cand = z * (1 + 1e-3 * torch.randn(z.shape, generator=g))
    labels = torch.tensor([0, 1, 2, 3])
    # -inf in both at the same places: those entries have p = q = 0 and count 0, the rest as without them (also
    # for a merged FP32 candidate, whose KL ~1e-13 is refined)
    merged = z * (1 + 1e-7 * torch.randn(z.shape, generator=g))
    for c in (cand, merged):
        ref_m, cand_m = z.clone(), c.clone()
        ref_m[:, 200:], cand_m[:, 200:] = float("-inf"), float("-inf")
        new = stats_of(ref_m, cand_m, labels)
        assert_close_to_exact(new, exact_stats(z[:, :200], c[:, :200], labels), "-inf in both")
    # -inf in the candidate where the reference has mass: KL = inf, as the float64 path says
    cand_m = cand.clone()
    cand_m[0, z[0].argmax()] = float("-inf")
    new, old = stats_of(z, cand_m, labels), stats_of(z.double(), cand_m.double(), labels)
    assert new["kl"][0] == math.inf and old["kl"][0] == math.inf
    assert np.all(np.isfinite(new["kl"][1:])) and np.allclose(new["kl"][1:], old["kl"][1:], rtol=1e-9)
    # -inf in the reference only: p = 0 there, terms 0, never NaN
    ref_m = z.clone()
    ref_m[:, :50] = float("-inf")
    new = stats_of(ref_m, cand, torch.tensor([60, 61, 62, 63]))
    assert np.all(np.isfinite(new["kl"])) and np.all(new["kl"] > 0)


def test_constant_shift_changes_nothing():
    """Logits on a 2^-10 grid in (-8, 8): z + 1e4 is exact in float32, so KL(z + 1e4 || c) = KL(z || c) exactly,
    also for nearly identical rows (KL ~1e-13, the refined ones), although the logits then differ by ~1e4 (the
    compact cache shifts the reference's log-probs by the entropy: the same situation)."""
    g = torch.Generator().manual_seed(8)
    z = torch.round(torch.clamp(2.5 * torch.randn(64, 2048, generator=g), -7.9, 7.9) * 1024) / 1024
    labels = torch.randint(2048, (64,), generator=g)
    for eps in (1e-7, 1e-3):
        fine = z * (1 + eps * torch.randn(z.shape, generator=g))  # not on the grid: only z shifts exactly
        for ref, cand, shifts in (
            (z, fine, ((z + 1e4, fine), (z - 1e4, fine))),
            (fine, z, ((fine, z + 1e4),)),
        ):
            base = stats_of(ref, cand, labels)
            for shifted_ref, shifted_cand in shifts:
                shifted = stats_of(shifted_ref, shifted_cand, labels)
                for k in ("kl", "logp_cand"):
                    assert np.all(np.abs(shifted[k] - base[k]) <= 1e-6 * np.abs(base[k])), (eps, k)
                assert_dp_close(shifted, base, f"shift {eps}")


def test_compact_reference_keeps_labels_exact():
    """A rounded reference (the compact cache: float16 of log p + H) with its exact label log-probs and argmax:
    the candidate's label log-prob is still its own exact one, and KL is that of the rounded reference."""
    z = llm_like(128, 2048, seed=9)
    g = torch.Generator().manual_seed(10)
    cand = z + 0.05 * torch.randn(z.shape, generator=g)
    labels = torch.randint(2048, (128,), generator=g)
    logp = torch.log_softmax(z.double(), -1)
    entropy = -(logp.exp() * logp).sum(-1, keepdim=True)
    compact = (logp + entropy).to(torch.float16).float()
    exact_ref = exact_stats(z, cand, labels)
    new = stats_of(
        compact, cand, labels, label_logp=logp.gather(-1, labels[:, None])[:, 0], argmax=z.argmax(-1)
    )
    for k in ("logp_ref", "logp_cand"):
        assert np.all(np.abs(new[k] - exact_ref[k]) <= 1e-6 * np.abs(exact_ref[k])), k
    assert_dp_close(new, exact_ref, "compact")
    kl = exact_stats(compact, cand, labels)["kl"]
    assert np.all(np.abs(new["kl"] - kl) <= 1e-6 * kl)
    # the exact cache: the float32 logits themselves with their label log-probs; a merged FP32 candidate's dp is
    # ~1e-7 p, and relative to it as exact as without them
    merged = z * (1 + 1e-7 * torch.randn(z.shape, generator=g))
    given = logp.gather(-1, labels[:, None])[:, 0]
    new = stats_of(z, merged, labels, label_logp=given, argmax=z.argmax(-1))
    assert_dp_close(new, exact_stats(z, merged, labels), "exact cache")


def test_row_argmax_is_torch_argmax():
    from lorafast_export.validate.metrics import _row_max

    g = torch.Generator().manual_seed(11)
    for vocab in (100, 130, 2048, 2049 + 64):
        z = torch.round(4 * torch.randn(50, vocab, generator=g))  # many ties
        z[0, -1] = 100.0  # the max in the tail that does not fill a block
        z[1, 5] = z[1, -1] = 100.0  # tied with the tail: the first one wins
        assert torch.equal(_row_max(z), z.argmax(-1)), vocab


def test_accumulator_float32_matches_float64():
    """MetricAccumulator on float32 logits against the same values given as float64: every scalar within 1e-6,
    the same histogram."""
    z = llm_like(300, 2048, seed=12)
    g = torch.Generator().manual_seed(13)
    labels = torch.randint(2048, (300,), generator=g)
    labels[::7] = IGNORE_INDEX
    for noise in (1e-3, 0.05, 0.5):
        cand = z + noise * torch.randn(z.shape, generator=g)
        a, b = MetricAccumulator(), MetricAccumulator()
        a.update(z, cand, labels)
        b.update(z.double(), cand.double(), labels)
        r32, r64 = a.result(), b.result()
        for k in TOKEN_METRICS:
            scale = max(abs(r64[k]), r64["dp_rms"]) if k.startswith("dp") else abs(r64[k])
            assert abs(r32[k] - r64[k]) <= 1e-6 * scale, (noise, k, r32[k], r64[k])
        assert r32["kl_hist"] == r64["kl_hist"]
        for b32, b64 in zip(r32["kl_by_position"], r64["kl_by_position"], strict=True):
            assert b32 == {**b64, "kl_mean": pytest.approx(b64["kl_mean"], rel=1e-6)}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_matches_cpu():
    z = llm_like(256, 2048, seed=14)
    labels = torch.randint(2048, (256,), generator=torch.Generator().manual_seed(15))
    for case, (ref, cand) in perturbed(z, seed=16).items():
        cpu = stats_of(ref, cand, labels)
        gpu = stats_of(ref.cuda(), cand.cuda(), labels.cuda())
        assert_close_to_exact(gpu, exact_stats(ref, cand, labels), case)
        assert np.array_equal(gpu["top1"], cpu["top1"]), case


def test_unrefined_sum_is_not_exact_for_nearly_identical_rows(monkeypatch):
    """Why rows under _REFINE_BELOW are recomputed: the plain float64 sum p (log p_ref - log p_cand) is off by
    ~1e-15 absolute, 1e-3 .. 1e-1 of the KL of a merged FP32 model; refined, ~1e-9."""
    import lorafast_export.validate.metrics as metrics

    z = llm_like(256, 2048, seed=17)
    cand = z * (1 + 1e-7 * torch.randn(z.shape, generator=torch.Generator().manual_seed(18)))
    labels = torch.zeros(256, dtype=torch.long)
    kl = exact_stats(z, cand, labels)["kl"]
    refined = stats_of(z, cand, labels)["kl"]
    monkeypatch.setattr(metrics, "_REFINE_BELOW", 0.0)
    plain = stats_of(z, cand, labels)["kl"]
    assert np.max(np.abs(refined - kl) / kl) < 1e-7
    assert np.max(np.abs(plain - kl) / kl) > 1e-3
