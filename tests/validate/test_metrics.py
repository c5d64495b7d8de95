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
