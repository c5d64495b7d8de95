"""KL error of the compact (16-bit) reference cache, measured against the exact float64 metrics.

    python bench/reference_cache_error.py

For each kind of distribution (flat: random-weight models; peaked: trained ones) and each vocabulary, the
reference logits are written to the cache in its compact form, read back, and the candidate's KL mean is
computed from them and from the exact logits; the table shows the difference (issue 13: <= 1e-4 nats)."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lorafast_export.validate import reference  # noqa: E402
from lorafast_export.validate.metrics import MetricAccumulator  # noqa: E402


def logits(kind: str, n: int, vocab: int, g: torch.Generator) -> torch.Tensor:
    x = torch.randn(n, vocab, generator=g)
    if kind == "flat":
        return 0.5 * x
    return 4.0 * x + 12.0 * (torch.rand(n, vocab, generator=g) < 0.001)


def kl(ref, cand, labels, **exact) -> float:
    acc = MetricAccumulator()
    acc.update(ref, cand, labels, None, *exact.values())
    return acc.result()["kl_mean"]


def main() -> None:
    reference.EXACT_CACHE_BYTES = 0  # force the compact form
    rows = []
    with tempfile.TemporaryDirectory() as d:
        os.environ["LORAFAST_CACHE"] = d
        for vocab in (32000, 128256):
            for kind in ("flat", "peaked"):
                g = torch.Generator().manual_seed(0)
                n = 256
                ref, labels = logits(kind, n, vocab, g), torch.randint(0, vocab, (n,), generator=g)
                cache = reference.ReferenceCache([kind, str(vocab)], {})
                w = cache.writer("ref", "0" * 16, n, vocab)
                w.put(0, ref, labels)
                rows_ = w.finish().rows(0, n)
                for noise in (0.0, 0.05, 0.5):
                    cand = ref + noise * torch.randn(ref.shape, generator=g)
                    exact = kl(ref, cand, labels)
                    compact = kl(rows_[0], cand, labels, lab=rows_[1], am=rows_[2])
                    rows.append((vocab, kind, noise, exact, compact, abs(compact - exact)))
    print("| vocab | distribution | candidate noise | KL mean exact | KL mean from cache | error (nats) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.4e} | {r[4]:.4e} | {r[5]:.1e} |")
    print(f"\nlargest error: {max(r[5] for r in rows):.1e} nats; bytes per token: 2 x vocab + 12")


if __name__ == "__main__":
    main()
