import pytest
import torch

from lorafast_export.errors import InputError
from lorafast_export.qform import dequantize, n_groups_for
from lorafast_export.quant.gptq import accumulate_hessian, gptq_quantize, gptq_quantize_many
from lorafast_export.quant.rtn import qparams, quantize_codes, quantize_rtn
from tests.quant.helpers import assert_same_qtensor, correlated_inputs


def textbook_gptq(w, H, bits, group_size, symmetric, act_order, damp_percent=0.01, static=False):
    """OBQ-style, one column at a time, in float64, with the explicit inverse Hessian updated by Gaussian
    elimination after every column (no Cholesky, no lazy batching). Returns (codes, scales) in the order
    the columns were quantized, plus that order. static: each group's params from the weights before the
    sweep (groups of the original column order), by quantize_rtn."""
    W, H = w.double().clone(), H.double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    fixed = quantize_rtn(W.float(), bits, group_size, symmetric) if static else None
    order = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(W.shape[1])
    W, H = W[:, order], H[order][:, order]
    H += damp_percent * torch.mean(torch.diag(H)) * torch.eye(H.shape[0], dtype=H.dtype)
    Hinv = torch.linalg.inv(H)
    n = W.shape[1]
    gs = n if group_size == -1 else group_size
    codes, scales = torch.zeros(W.shape, dtype=torch.uint8), []
    for j in range(n):
        if fixed is not None:
            g = int(order[j]) // gs
            s, z = fixed.scales[:, g], None if symmetric else fixed.zeros[:, g]
        elif j % gs == 0:
            grp = W if group_size == -1 else W[:, j : j + gs]
            s, z = qparams(grp.amin(dim=1), grp.amax(dim=1), bits, symmetric)
            scales.append(s)
        q = quantize_codes(W[:, j], s, z, bits)
        codes[:, j] = q
        dq = (q.double() - (2 ** (bits - 1) if z is None else z.double())) * s.double()
        err = (W[:, j] - dq) / Hinv[j, j]
        W[:, j + 1 :] -= err[:, None] * Hinv[j, j + 1 :][None, :]
        Hinv = Hinv - torch.outer(Hinv[:, j], Hinv[j, :]) / Hinv[j, j]
    return codes, (fixed.scales if fixed is not None else torch.stack(scales, dim=1)), order


def output_mse(x, w, w_hat):
    return float((x @ w.T - x @ w_hat.T).pow(2).mean())


def toy_layer(out=24, in_=64, tokens=512, seed=0):
    x = correlated_inputs(tokens, in_, seed=seed)
    w = torch.randn(out, in_, generator=torch.Generator().manual_seed(seed + 1)) * 0.1
    H, n = accumulate_hessian(None, 0, x)
    return x, w, H


def test_accumulate_hessian_is_running_average_of_2_xtx():
    x = torch.randn(100, 16)
    H, n = None, 0
    for chunk in x.split([30, 0, 45, 25]):
        H, n = accumulate_hessian(H, n, chunk)
    assert n == 100 and H.dtype == torch.float32
    assert torch.allclose(H, 2 / 100 * x.T @ x, rtol=1e-5, atol=1e-5)
    H3, n3 = accumulate_hessian(None, 0, x.reshape(4, 25, 16))  # [batch, seq, in] is flattened to tokens
    assert n3 == 100 and torch.allclose(H3, H, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize(
    "symmetric,group_size,block_size", [(True, 16, 32), (False, 16, 24), (False, -1, 16), (True, 32, 128)]
)
def test_lazy_batched_gptq_matches_textbook(act_order, symmetric, group_size, block_size):
    x, w, H = toy_layer()
    qt = gptq_quantize(w, H, 4, group_size, symmetric, act_order=act_order, block_size=block_size)
    ref_codes, ref_scales, order = textbook_gptq(w, H, 4, group_size, symmetric, act_order)
    agree = (qt.codes[:, order] == ref_codes).float().mean()
    assert agree > 0.99, float(agree)  # float32 vs float64 may flip a rare rounding tie
    if agree == 1:
        assert torch.equal(qt.scales, ref_scales)
    assert qt.scales.shape == (24, n_groups_for(64, group_size))


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize(
    "symmetric,group_size,block_size", [(True, 16, 32), (False, 16, 24), (False, 32, 128)]
)
def test_static_groups_match_textbook(act_order, symmetric, group_size, block_size):
    """Static groups: every group's params are RTN's on the weights before the sweep, the groups stay contiguous
    in the original column order even with act_order (no g_idx), and the sweep equals the textbook's."""
    x, w, _ = toy_layer(seed=3)
    x[:, 5] = 0.0  # a dead input
    H, _ = accumulate_hessian(None, 0, x)
    qt = gptq_quantize(w, H, 4, group_size, symmetric, act_order, block_size=block_size, static_groups=True)
    ref_codes, ref_scales, order = textbook_gptq(w, H, 4, group_size, symmetric, act_order, static=True)
    assert qt.g_idx is None and torch.equal(qt.scales, ref_scales)
    agree = (qt.codes[:, order] == ref_codes).float().mean()
    assert agree > 0.99, float(agree)
    gptq = output_mse(x, w, dequantize(qt))
    assert gptq < 0.8 * output_mse(x, w, dequantize(quantize_rtn(w, 4, group_size, symmetric))), gptq


@pytest.mark.parametrize("symmetric,group_size", [(True, -1), (False, 16), (True, 32)])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_correlated_inputs(symmetric, group_size, act_order):
    x, w, H = toy_layer(seed=5)
    gptq = output_mse(x, w, dequantize(gptq_quantize(w, H, 4, group_size, symmetric, act_order=act_order)))
    rtn = output_mse(x, w, dequantize(quantize_rtn(w, 4, group_size, symmetric)))
    assert gptq < 0.8 * rtn, (gptq, rtn)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize(
    "symmetric,group_size,block_size", [(True, 16, 32), (False, 32, 128), (False, -1, 16)]
)
def test_linears_sharing_one_hessian_solve_as_one_stacked_matrix(
    act_order, symmetric, group_size, block_size
):
    """q/k/v (and gate/up) see one input, so one H: GPTQ on their stacked rows is GPTQ on each, bit for bit."""
    _, _, H = toy_layer(seed=6)
    g = torch.Generator().manual_seed(7)
    ws = [torch.randn(n, 64, generator=g) * 0.1 for n in (32, 8, 8)]  # q, k, v of a GQA layer
    biases = [torch.randn(32, generator=g), None, torch.randn(8, generator=g)]
    stacked = gptq_quantize_many(
        ws, H, 4, group_size, symmetric, act_order, block_size=block_size, biases=biases
    )
    for w, b, qt in zip(ws, biases, stacked, strict=True):
        assert_same_qtensor(
            qt, gptq_quantize(w, H, 4, group_size, symmetric, act_order, block_size=block_size, bias=b)
        )
    assert len({qt.codes.untyped_storage().data_ptr() for qt in stacked}) == 3  # each owns its tensors


def test_act_order_dequantizes_in_original_column_order():
    x, w, H = toy_layer(seed=2)
    qt = gptq_quantize(w, H, 4, 16, symmetric=False, act_order=True)
    perm = torch.argsort(torch.diag(H), descending=True)
    # GPTQ's g_idx: the group of column perm[k] is k // group_size
    assert torch.equal(qt.g_idx[perm].long(), torch.arange(64) // 16)
    # dequantizing the permuted layer with contiguous groups, then un-permuting, is the same tensor
    codes_p = qt.codes[:, perm].float()
    g_contig = torch.arange(64) // 16
    w_p = (codes_p - qt.zeros[:, g_contig].float()) * qt.scales[:, g_contig].float()
    assert torch.equal(w_p[:, torch.argsort(perm)], dequantize(qt))
    assert output_mse(x, w, dequantize(qt)) < output_mse(x, w, dequantize(quantize_rtn(w, 4, 16, False)))


def test_dead_inputs_get_zero_weight_and_no_nan():
    x, w, H = toy_layer(seed=3)
    x[:, 7] = 0.0
    H, _ = accumulate_hessian(None, 0, x)
    qt = gptq_quantize(w, H, 4, 16, symmetric=True, act_order=True)
    wq = dequantize(qt)
    assert torch.isfinite(wq).all() and torch.all(wq[:, 7] == 0)


def test_gptq_8bit_is_near_lossless():
    x, w, H = toy_layer(seed=4)
    qt = gptq_quantize(w, H, 8, -1, symmetric=True)
    assert output_mse(x, w, dequantize(qt)) < 1e-4 * float((x @ w.T).pow(2).mean())


def test_gptq_rejects_bad_arguments():
    _, w, H = toy_layer()
    with pytest.raises(InputError, match="H"):
        gptq_quantize(w, H[:10, :10], 4, 16, True)
    with pytest.raises(InputError, match="damp_percent"):
        gptq_quantize(w, H, 4, 16, True, damp_percent=0.0)
    with pytest.raises(InputError, match="positive definite"):
        gptq_quantize(w, -H, 4, 16, True)


def _hessian_error(w: torch.Tensor, qt, H: torch.Tensor) -> torch.Tensor:
    """Per row: (w - Ŵ) H (w - Ŵ)ᵀ, GPTQ's objective on its calibration inputs."""
    d = (w - dequantize(qt).float()).double()
    return ((d @ H.double()) * d).sum(1)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize(
    ("act_order", "static_groups"), [(False, True), (True, True), (True, False), (False, False)]
)
def test_scale_refit_is_the_least_squares_optimum_for_the_codes(symmetric, act_order, static_groups):
    """refit=True keeps the codes and zero points and gives each row the scales that an independent float64
    least-squares solve (per row, through H's Cholesky factor) finds for those codes, up to the scales' fp16 rounding;
    no row's objective gets worse. A ragged last group (200 = 6 x 32 + 8) is included."""
    torch.manual_seed(0)
    n, gs = 200, 32
    H, _ = accumulate_hessian(None, 0, correlated_inputs(4096, n))
    w = torch.randn(24, n) * 0.05
    kw = dict(act_order=act_order, static_groups=static_groups)
    plain = gptq_quantize(w, H, 4, gs, symmetric, **kw)
    refit = gptq_quantize_many([w], H, 4, gs, symmetric, refit=True, **kw)[0]
    assert torch.equal(refit.codes, plain.codes)
    assert (refit.zeros is None) == symmetric and (symmetric or torch.equal(refit.zeros, plain.zeros))
    assert torch.equal(refit.g_idx, plain.g_idx) if plain.g_idx is not None else refit.g_idx is None
    before, after = _hessian_error(w, plain, H), _hessian_error(w, refit, H)
    assert (after <= before * (1 + 1e-6)).all()
    # the independent solve: min over s of |Lᵀ (w - U s)|², U[c, g(c)] = code_c - zero
    G = plain.scales.shape[1]
    groups = plain.g_idx.long() if plain.g_idx is not None else torch.arange(n) // gs
    zero = torch.full_like(plain.scales.float(), 8.0) if symmetric else plain.zeros.float()
    L = torch.linalg.cholesky(H.double())
    best = []
    for r in range(w.shape[0]):
        U = torch.zeros(n, G, dtype=torch.float64)
        U[torch.arange(n), groups] = plain.codes[r].double() - zero[r, groups].double()
        s = torch.linalg.lstsq(L.T @ U, L.T @ w[r].double()).solution
        d = w[r].double() - U @ s
        best.append(float(d @ H.double() @ d))
    best = torch.tensor(best, dtype=torch.float64)
    assert after.sum() < before.sum() * 0.99  # a real gain on these inputs
    # the optimum but for the scales' fp16 rounding: each row takes >= 98% of the gain the exact solve offers
    assert ((after - best) <= 0.02 * (before - best) + 1e-12).all()


def test_scale_refit_keeps_scales_of_groups_with_no_signal():
    """A group whose inputs never fire (dead columns) or whose codes all sit on the zero point has nothing to fit: its
    scale stays as the sweep set it, and nothing becomes NaN."""
    torch.manual_seed(1)
    n, gs = 96, 32
    x = correlated_inputs(2048, n)
    x[:, 32:64] = 0.0  # group 1 never fires
    H, _ = accumulate_hessian(None, 0, x)
    w = torch.randn(16, n) * 0.05
    plain = gptq_quantize(w, H, 4, gs, False)
    refit = gptq_quantize_many([w], H, 4, gs, False, refit=True)[0]
    assert torch.isfinite(refit.scales.float()).all()
    assert torch.equal(refit.scales[:, 1], plain.scales[:, 1])
