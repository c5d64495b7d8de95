"""The per-group range search (quant/search.py) and GPTQ with it, against plain loops written from the reference."""

from __future__ import annotations

import pytest
import torch

from lorafast_export.quant.gptq import RangeSearch, _static_params, accumulate_hessian, gptq_quantize
from lorafast_export.quant.rtn import qparams, quantize_codes
from lorafast_export.quant.search import search_qparams
from tests.quant.helpers import correlated_inputs


def loop_search(w, bits, symmetric, grid, max_shrink, norm, col_weight):
    """GPTQ's find_params(mse=True), row by row and candidate by candidate (p = 1 first, strict improvement)."""
    scales, zeros = [], []
    for row in w:
        best = None
        for i in range(int(max_shrink * grid) + 1):
            p = 1 - i / grid
            s, z = qparams(p * row.min()[None], p * row.max()[None], bits, symmetric)
            q = quantize_codes(row, s, z, bits).float()
            deq = (q - (2 ** (bits - 1) if z is None else z.float())) * s.float()
            err = float(((deq - row).abs().pow(norm) * col_weight).sum())
            if best is None or err < best[0]:
                best = (err, s, z)
        scales.append(best[1])
        zeros.append(best[2])
    return torch.cat(scales), None if symmetric else torch.cat(zeros)


def weighted_error(w, s, z, bits, col_weight):
    q = quantize_codes(w, s[:, None], None if z is None else z[:, None], bits).float()
    deq = (q - (2 ** (bits - 1) if z is None else z[:, None].float())) * s[:, None].float()
    return ((deq - w).pow(2) * col_weight).sum(dim=1)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("norm,weighted", [(2.0, True), (2.4, False)])
def test_search_equals_the_reference_loop(symmetric, norm, weighted):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(12, 32, generator=g) * torch.rand(12, 1, generator=g)
    w[3, 5] = 4.0  # an outlier: shrinking its group's range pays
    col_weight = torch.rand(32, generator=g) if weighted else torch.ones(32)
    got = search_qparams(
        w, 4, symmetric, torch.float16, 20, 0.5, norm, col_weight if weighted else None, chunk=3
    )
    want = loop_search(w, 4, symmetric, 20, 0.5, norm, col_weight)
    assert torch.equal(got[0], want[0])
    assert (got[1] is None) == symmetric and (symmetric or torch.equal(got[1], want[1]))


@pytest.mark.parametrize("symmetric", [False, True])
def test_search_is_never_worse_than_min_max_and_often_better(symmetric):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(64, 128, generator=g) ** 3  # heavy tails: min-max wastes levels on the extremes
    col_weight = torch.rand(128, generator=g)
    s0, z0 = qparams(w.amin(1), w.amax(1), 4, symmetric)
    s1, z1 = search_qparams(w, 4, symmetric, torch.float16, 100, 0.8, 2.0, col_weight)
    e0, e1 = weighted_error(w, s0, z0, 4, col_weight), weighted_error(w, s1, z1, 4, col_weight)
    assert bool((e1 <= e0).all())
    assert float(e1.sum()) < 0.97 * float(e0.sum())
    s2, z2 = search_qparams(w, 4, symmetric, torch.float16, 100, 0.0, 2.0, col_weight)  # no shrink: min-max
    assert torch.equal(s2, s0) and (symmetric or torch.equal(z2, z0))


@pytest.mark.parametrize("symmetric,group_size", [(False, 16), (True, 32)])
def test_gptq_with_search_matches_a_textbook_sweep_with_the_same_group_params(symmetric, group_size):
    """Each group's params searched on the already-updated weights at the group's start, weighted by diag(H)."""
    x = correlated_inputs(512, 64, seed=2)
    w = torch.randn(24, 64, generator=torch.Generator().manual_seed(3)) * 0.1
    H, _ = accumulate_hessian(None, 0, x)
    search = RangeSearch(grid=20, max_shrink=0.5)
    qt = gptq_quantize(w, H, 4, group_size, symmetric, search=search)

    W, Hd = w.double().clone(), H.double() + 0.01 * torch.mean(torch.diag(H.double())) * torch.eye(64)
    Hinv = torch.linalg.inv(Hd)
    codes = torch.zeros(W.shape, dtype=torch.uint8)
    for j in range(64):
        if j % group_size == 0:
            s, z = search_qparams(W[:, j : j + group_size].float(), 4, symmetric, torch.float16, 20, 0.5, 2.0,
                                  torch.diag(H)[j : j + group_size])  # fmt: skip
        q = quantize_codes(W[:, j], s, z, 4)
        codes[:, j] = q
        err = (W[:, j] - (q.double() - (8 if z is None else z.double())) * s.double()) / Hinv[j, j]
        W[:, j + 1 :] -= err[:, None] * Hinv[j, j + 1 :][None, :]
        Hinv = Hinv - torch.outer(Hinv[:, j], Hinv[j, :]) / Hinv[j, j]
    assert (qt.codes == codes).float().mean() > 0.98  # float32 vs float64 may flip a rare rounding tie


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize(
    "n_in,group_size", [(96, 32), (80, 32), (64, -1)]
)  # whole groups, a ragged one, per row
def test_static_search_of_all_groups_at_once_equals_one_search_per_group(symmetric, n_in, group_size):
    """static_groups with the search (gptq's default at g >= 128): every whole group searched in one call, each row
    weighted by its own group's diag(H), gives exactly the params of one search_qparams call per group."""
    W = torch.randn(40, n_in, generator=torch.Generator().manual_seed(4)) * 0.1
    W[:, :3] *= 8  # a few loud columns, so the searched ranges differ from min-max
    hdiag = torch.rand(n_in, generator=torch.Generator().manual_seed(5)) + 0.05
    search = RangeSearch()
    scales, zeros = _static_params(W, 4, group_size, symmetric, torch.float16, search, hdiag)
    gs = n_in if group_size == -1 else group_size
    for g, c in enumerate(range(0, n_in, gs)):
        s, z = search_qparams(W[:, c : c + gs], 4, symmetric, torch.float16, 100, 0.8, 2.0, hdiag[c : c + gs])
        assert torch.equal(scales[:, g], s), g
        assert (zeros is None and z is None) or torch.equal(zeros[:, g], z), g
    plain = _static_params(W, 4, group_size, symmetric, torch.float16, None, hdiag)[0]
    assert not torch.equal(scales, plain)  # the search changed something


def test_search_scores_candidates_in_chunks_with_the_same_choice():
    """The candidate chunking (smaller for large w) never changes a row's choice."""
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(6)) * 0.05
    cw = torch.rand(64, 128, generator=torch.Generator().manual_seed(7))  # a weight per row and column
    ref = search_qparams(w, 4, False, torch.float16, 100, 0.8, 2.0, cw, chunk=81)
    for chunk in (1, 7, 16):
        got = search_qparams(w, 4, False, torch.float16, 100, 0.8, 2.0, cw, chunk=chunk)
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1]), chunk
