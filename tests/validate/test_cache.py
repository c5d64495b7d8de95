"""The bounded reference cache: written and read back block by block; the compact (16-bit) form adds at most
1e-4 nats of KL (issue 13) on flat (random-weight) and peaked (trained) distributions; the exact form is exact."""

import numpy as np
import pytest
import torch

from lorafast_export.validate import reference
from lorafast_export.validate.metrics import MetricAccumulator
from lorafast_export.validate.reference import ReferenceCache


def _logits(kind: str, n: int, vocab: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, vocab, generator=g)
    if kind == "flat":  # a random-weight model: nearly uniform over a large vocabulary
        return 0.5 * x
    return 4.0 * x + 12.0 * (
        torch.rand(n, vocab, generator=g) < 0.001
    )  # trained: a few tokens carry the mass


def _roundtrip(tmp_path, monkeypatch, logits, labels, exact_bytes, block=64):
    monkeypatch.setenv("LORAFAST_CACHE", str(tmp_path))
    monkeypatch.setattr(reference, "EXACT_CACHE_BYTES", exact_bytes)
    cache = ReferenceCache(["x"], {"t": 1})
    w = cache.writer("ref", "d" * 16, len(labels), logits.shape[1])
    for r in range(0, len(labels), block):  # written block by block
        w.put(r, logits[r : r + block], labels[r : r + block])
    w.finish()
    entry = cache.open("ref", "d" * 16, len(labels))
    assert entry is not None and entry.exact == (exact_bytes > 0)
    return entry


def _kl_mean(ref_rows, cand, labels):
    acc = MetricAccumulator()
    ref, lab, am = ref_rows
    acc.update(ref, cand, labels, None, lab, am)
    return acc.result()


@pytest.mark.parametrize("kind", ["flat", "peaked"])
def test_compact_cache_kl_error_within_bound(tmp_path, monkeypatch, kind):
    n, vocab = 256, 32000
    ref = _logits(kind, n, vocab)
    labels = torch.randint(0, vocab, (n,))
    entry = _roundtrip(tmp_path, monkeypatch, ref, labels, exact_bytes=0)
    assert entry.logits_dtype == np.float16
    assert (entry.path / "logits.bin").stat().st_size == n * vocab * 2  # 16 bits per log-prob on disk
    rows = entry.rows(0, n)
    for cand in (ref, ref + 0.05 * torch.randn_like(ref), ref + 0.5 * torch.randn_like(ref)):
        truth = MetricAccumulator()
        truth.update(ref, cand, labels)
        t, c = truth.result(), _kl_mean(rows, cand, labels)
        assert abs(c["kl_mean"] - t["kl_mean"]) <= 1e-4, (kind, c["kl_mean"], t["kl_mean"])
        assert abs(c["kl_max"] - t["kl_max"]) <= 1e-3
        # label log-probs and the argmax are stored exactly: perplexity and top-1 do not move
        assert c["ppl_ref"] == pytest.approx(t["ppl_ref"], rel=1e-12)
        assert c["top1"] == t["top1"]
    # identical candidate: the cache's own rounding is all that shows
    assert _kl_mean(rows, ref, labels)["kl_mean"] <= 1e-4


def test_exact_cache_is_exact(tmp_path, monkeypatch):
    n, vocab = 100, 500
    ref, labels = _logits("peaked", n, vocab), torch.randint(0, vocab, (n,))
    entry = _roundtrip(tmp_path, monkeypatch, ref, labels, exact_bytes=1 << 30, block=7)
    got, lab, am = entry.rows(10, 50)
    assert torch.equal(got, ref[10:60])
    logp = torch.log_softmax(ref.double(), -1)
    assert torch.equal(lab, logp.gather(-1, labels[:, None])[10:60, 0])
    assert torch.equal(am, logp.argmax(-1)[10:60])


def test_unfinished_entry_is_not_read(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAFAST_CACHE", str(tmp_path))
    cache = ReferenceCache(["x"], {})
    w = cache.writer("ref", "e" * 16, 10, 20)
    w.put(0, torch.randn(10, 20), torch.zeros(10, dtype=torch.long))
    assert cache.open("ref", "e" * 16, 10) is None  # no meta.json: as if absent
    w.abort()
    assert cache.open("ref", "e" * 16, 10) is None and not list(cache.dir.iterdir())
