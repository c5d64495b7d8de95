import pytest
import torch

from lorafast_export.errors import InputError
from lorafast_export.model.decoder import DecoderLayer, Rotary
from lorafast_export.model.spec import ModelConfig
from lorafast_export.qform import dequantize
from lorafast_export.quant.awq import (
    _gram,
    _gram_loss,
    _quant_loss,
    _weight_mean,
    apply_clip,
    awq_candidate_scale,
    awq_scale_finalists,
    awq_search_clip,
    awq_search_scale,
    clip_tokens,
    fold_scale_into_previous,
)
from lorafast_export.quant.blocks import Block
from lorafast_export.quant.config import resolve_quant
from lorafast_export.quant.methods import quantize_block_awq, quantize_block_rtn
from lorafast_export.quant.rtn import quantize_rtn
from lorafast_export.testing import tiny_config
from tests.quant.helpers import correlated_inputs, make_block

torch.set_default_dtype(torch.float32)


def rms_norm(x, weight, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def test_fold_into_norm_leaves_unrounded_output_unchanged():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(10, 32, generator=g, dtype=torch.float64)
    norm_w = torch.rand(32, generator=g, dtype=torch.float64) + 0.5
    q, k, v = (torch.randn(n, 32, generator=g, dtype=torch.float64) for n in (32, 16, 16))
    s = torch.rand(32, generator=g, dtype=torch.float64) * 4 + 0.1
    f = fold_scale_into_previous(norm_w, [q, k, v], s)
    for before, after in zip((q, k, v), f.linears):
        assert torch.allclose(rms_norm(h, norm_w) @ before.T, rms_norm(h, f.prev_weight) @ after.T, rtol=1e-6)
    assert f.prev_bias is None and f.prev_weight.dtype == torch.float64


def test_fold_into_gemma_style_norm_with_offset():
    h, w, lin, s = torch.randn(4, 8), torch.randn(8) * 0.1, torch.randn(3, 8), torch.rand(8) + 0.5
    f = fold_scale_into_previous(w, [lin], s, norm_offset=1.0)
    assert torch.allclose(
        rms_norm(h, 1 + w) @ lin.T, rms_norm(h, 1 + f.prev_weight) @ f.linears[0].T, atol=1e-5
    )


def test_fold_linear_into_linear_v_proj_to_o_proj():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 24, generator=g, dtype=torch.float64)
    v_w, v_b = (
        torch.randn(16, 24, generator=g, dtype=torch.float64),
        torch.randn(16, generator=g, dtype=torch.float64),
    )
    o_w = torch.randn(24, 16, generator=g, dtype=torch.float64)
    s = torch.rand(16, generator=g, dtype=torch.float64) + 0.2
    f = fold_scale_into_previous(v_w, [o_w], s, prev_bias=v_b)
    before = (x @ v_w.T + v_b) @ o_w.T
    after = (x @ f.prev_weight.T + f.prev_bias) @ f.linears[0].T
    assert torch.allclose(before, after, rtol=1e-9, atol=1e-9)


def test_fold_refuses_mismatched_shapes():
    with pytest.raises(InputError, match="grouped-query"):
        fold_scale_into_previous(torch.randn(8, 32), [torch.randn(32, 16)], torch.rand(8) + 1)  # GQA v→o
    with pytest.raises(InputError, match="positive"):
        fold_scale_into_previous(torch.randn(8), [torch.randn(4, 8)], torch.zeros(8))


def awq_toy(seed=0, in_=128, outs=(64, 32)):
    x = correlated_inputs(256, in_, seed=seed, outlier_channels=4)
    g = torch.Generator().manual_seed(seed + 10)
    ws = [torch.randn(n, in_, generator=g) * 0.05 for n in outs]
    return x, ws


def output_mse(x, ws, ws_hat):
    return sum(float((x @ w.T - x @ wh.T).pow(2).mean()) for w, wh in zip(ws, ws_hat))


@pytest.mark.parametrize("symmetric", [False, True])
def test_awq_scale_beats_rtn_with_outlier_channels(symmetric):
    x, ws = awq_toy()
    s = awq_search_scale(ws, x, bits=4, group_size=32, symmetric=symmetric)
    assert s.shape == (128,) and torch.all(s > 0)
    rtn = [dequantize(quantize_rtn(w, 4, 32, symmetric)) for w in ws]
    awq = [dequantize(quantize_rtn(w * s, 4, 32, symmetric)) / s for w in ws]  # Q(W·s) applied to x/s
    assert output_mse(x, ws, awq) < 0.7 * output_mse(x, ws, rtn)


def test_awq_scale_with_custom_forward_fn():
    x, ws = awq_toy(seed=1, outs=(32,))
    down = torch.randn(16, 32) * 0.1

    def block(weights):  # a two-layer block: the search judges the block output, not the linear's
        return torch.relu(x @ weights[0].T) @ down.T

    s = awq_search_scale(ws, x, 4, 32, forward_fn=block)
    assert s.shape == (128,) and torch.isfinite(s).all()


def test_screened_scale_search_decides_among_finalists_in_full_precision():
    """screen: every candidate scored in bf16 first, the finalists and s = 1 again in float32; with every candidate
    a finalist it is the plain search, and it scores only finalists + s = 1 outside the screen."""
    x, ws = awq_toy(seed=2)
    forward = lambda weights: torch.cat([x @ w.T for w in weights], dim=-1)  # noqa: E731
    plain = awq_search_scale(ws, x, 4, 32, forward_fn=forward)
    screen = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    assert torch.equal(awq_search_scale(ws, x, 4, 32, forward_fn=forward, screen=screen, finalists=21), plain)
    calls = {"screened": 0, "full": 0}

    def linears(weights):
        calls["screened" if torch.is_autocast_enabled("cpu") else "full"] += 1
        return torch.cat([x @ w.T for w in weights], dim=-1)

    s = awq_search_scale(ws, x, 4, 32, forward_fn=linears, screen=screen, finalists=3)
    assert calls == {"screened": 22, "full": 1 + 4} or calls == {
        "screened": 22,
        "full": 1 + 3,
    }  # s = 1 a finalist
    rtn = [dequantize(quantize_rtn(w, 4, 32, False)) for w in ws]
    awq = [dequantize(quantize_rtn(w * s, 4, 32, False)) / s for w in ws]
    assert output_mse(x, ws, awq) < 0.7 * output_mse(x, ws, rtn)
    assert torch.equal(s, plain)  # on this toy the float32 best is among bf16's three best
    # rescore=False (awq-gptq, whose GPTQ trials decide): the screen's 10 best and s = 1, no float32 forward
    calls.update(screened=0, full=0)
    fin = awq_scale_finalists(ws, x, 4, 32, forward_fn=linears, screen=screen, finalists=10, rescore=False)
    assert calls == {"screened": 22, "full": 0}
    every = awq_scale_finalists(ws, x, 4, 32, forward_fn=linears, screen=screen, finalists=21, rescore=False)
    assert len(every) == 21 and all(torch.equal(a, b) for a, b in zip(fin[:10], every[:10], strict=True))
    assert any(torch.equal(c, torch.ones_like(c)) for c in fin) and len(fin) in (10, 11)


@pytest.mark.parametrize("group_size", [32, 48])  # 128 inputs: whole groups, and a ragged last group
def test_linear_group_scored_from_the_gram_matrix_as_by_its_forward(group_size):
    """A group without a block (down_proj) scores every candidate from XᵀX on the CPU: each loss equals the forward's
    output MSE (up to float rounding), and the ranking, hence the scale and the finalists, is the forward's."""
    x, ws = awq_toy(seed=4)
    forward = lambda weights: torch.cat([x.double() @ w.double().T for w in weights], dim=-1)  # noqa: E731
    x_mean, w_mean = x.abs().mean(dim=0), _weight_mean(ws, group_size)
    gram = _gram(x)
    for r in (0, 5, 19):
        s = awq_candidate_scale(x_mean, w_mean, r / 20)
        direct = _quant_loss(forward, forward(ws), ws, s, 4, group_size, False, torch.float16)
        assert _gram_loss(gram, x.shape[0], ws, s, 4, group_size, False, torch.float16) == pytest.approx(
            direct, rel=1e-4
        )
    by_gram = awq_scale_finalists(ws, x, 4, group_size)
    by_forward = awq_scale_finalists(ws, x, 4, group_size, forward_fn=forward)
    assert len(by_gram) == len(by_forward) and all(torch.equal(a, b) for a, b in zip(by_gram, by_forward))
    assert any(torch.equal(f, torch.ones(128)) for f in by_gram)  # s = 1 is always a finalist


def test_awq_clip_does_not_increase_output_error():
    x, ws = awq_toy(seed=2)
    w = ws[0]
    max_val = awq_search_clip(w, x, bits=4, group_size=32)
    assert max_val.shape == (64, 4)
    clipped = apply_clip(w, max_val, 32)
    assert torch.all(clipped.abs() <= w.abs())
    err_clip = output_mse(x, [w], [dequantize(quantize_rtn(clipped, 4, 32, False))])
    err_plain = output_mse(x, [w], [dequantize(quantize_rtn(w, 4, 32, False))])
    assert err_clip <= err_plain * 1.0001


def test_awq_rejects_bad_groups():
    x, ws = awq_toy()
    with pytest.raises(InputError, match="group_size=0"):
        awq_search_scale(ws, x, 4, 0)
    with pytest.raises(InputError, match="width of x"):
        awq_search_scale([torch.randn(4, 64)], x, 4, 32)


@pytest.mark.parametrize("tokens", [300, 512, 1023, 1024, 1535, 5000, 262144])
def test_clip_tokens_sampled_twice_is_sampled_once(tokens):
    """The walk samples the clip tokens before scaling them; awq_search_clip's own sampling keeps them whole."""
    x = torch.arange(tokens, dtype=torch.float32)[:, None].expand(tokens, 4)
    once = clip_tokens(x)
    assert torch.equal(clip_tokens(once), once) and len(once) >= min(tokens, 512)


def test_clip_search_on_presampled_scaled_tokens_equals_the_full_input():
    x = correlated_inputs(4096, 64, seed=9, outlier_channels=2)
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(10)) * 0.1
    s = torch.rand(64, generator=torch.Generator().manual_seed(11)) + 0.5
    full = awq_search_clip(w * s, x / s, 4, 16)
    assert torch.equal(awq_search_clip(w * s, clip_tokens(x) / s, 4, 16), full)
    assert torch.equal(awq_search_clip(w * s, x / s, 4, 16, out_chunk=5), full)  # row chunks change nothing


def test_clip_search_on_ragged_groups_matches_a_search_with_the_real_quantizer():
    """in = 40, group 16: groups of 16, 16 and 8 columns. Brute force with quantize_rtn itself (its ragged path)
    on the unpadded weight, per group and shrink step, picks the same max |w| as the padded search."""
    from lorafast_export.qform import group_index
    from lorafast_export.quant.awq import apply_clip, awq_search_clip

    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(24, 40, generator=g), torch.randn(256, 40, generator=g)
    bits, gs, n_grid, shrink = 4, 16, 20, 0.5
    got = awq_search_clip(w, x, bits, gs, symmetric=False, n_grid=n_grid, max_shrink=shrink)
    gi = group_index(40, gs)
    org = torch.stack([w[:, gi == j].abs().amax(dim=1) for j in range(3)], dim=1)  # [out, 3]
    best, best_err = org.clone(), torch.full_like(org, float("inf"))
    for i_s in range(int(shrink * n_grid)):
        m = org * (1 - i_s / n_grid)
        q = dequantize(quantize_rtn(apply_clip(w, m, gs), bits, gs, False))  # the real (ragged) quantizer
        for j in range(3):
            cols = gi == j
            err = (x[:, cols] @ q[:, cols].T - x[:, cols] @ w[:, cols].T).pow(2).mean(dim=0)  # [out]
            better = err < best_err[:, j]
            best_err[better, j], best[better, j] = err[better], m[better, j]
    assert got.shape == (24, 3)
    torch.testing.assert_close(got, best, rtol=1e-6, atol=0)
    assert (got < org).any()  # the search did clip somewhere, including in the short last group's rows


@pytest.mark.parametrize("dead_weights", ["zero", "random"])
def test_dead_channels_keep_s_1_and_leave_the_live_scales_as_without_them(dead_weights):
    """Input channels whose calibration input is all zero (a pruned model's, or the zero dims of a model padded
    to a wider shape) add nothing to the output whatever their s: they keep s = 1, and the live channels get the
    scales that the same search gives without them. The truth is the unpadded problem's search. Before, the dead
    channels' clamped 1e-4 was the min of the sqrt(max·min) normalisation: every live s came out ~100x too large."""
    x, ws = awq_toy(seed=3)  # 128 live channels, groups of 32
    dead = 64  # two more whole groups
    xp = torch.cat([x, torch.zeros(x.shape[0], dead)], dim=1)
    g = torch.Generator().manual_seed(7)
    pads = [
        torch.zeros(w.shape[0], dead)
        if dead_weights == "zero"
        else torch.randn(w.shape[0], dead, generator=g) * 0.05
        for w in ws
    ]
    wp = [torch.cat([w, pad], dim=1) for w, pad in zip(ws, pads, strict=True)]
    x_mean, w_mean = x.abs().mean(dim=0), _weight_mean(ws, 32)
    xp_mean, wp_mean = xp.abs().mean(dim=0), _weight_mean(wp, 32)
    for r in (0, 1, 10, 19):
        padded = awq_candidate_scale(xp_mean, wp_mean, r / 20)
        assert torch.equal(padded[:128], awq_candidate_scale(x_mean, w_mean, r / 20)), r
        assert torch.equal(padded[128:], torch.ones(dead)), r
    s, sp = awq_search_scale(ws, x, 4, 32), awq_search_scale(wp, xp, 4, 32)
    assert not torch.equal(s, torch.ones(128))  # the toy's outliers make a real scale win
    torch.testing.assert_close(sp[:128], s, rtol=1e-6, atol=0)
    assert torch.equal(sp[128:], torch.ones(dead))
    every_dead = awq_candidate_scale(torch.zeros(8), torch.rand(8), 0.5)
    assert torch.equal(every_dead, torch.ones(8))  # a group with no live channel (an all-zero layer): s = 1


def _mlp_output(block: Block) -> torch.Tensor:
    seen = []
    hook = block.get("mlp").register_forward_hook(lambda _m, _a, out: seen.append(out))
    block.run()
    hook.remove()
    return torch.cat(seen)


@pytest.mark.parametrize("symmetric", [True, False])
def test_awq_on_a_pruned_mlp_is_no_worse_than_rtn(symmetric):
    """Half the MLP's intermediate channels pruned (their gate / up rows and down columns zero: their activations
    are exactly 0, as in a pruned model or one widened with zero dims, like make_model.py widen's 8B shape). The
    truth is the unquantized layer; RTN's MLP error is the bound AWQ must stay under. Before, the dead channels
    made every live down_proj scale x20-70 too large, the fold divided up_proj's rows by it, and up_proj's (small)
    weights fell below float16's smallest normal scale: its output was mostly rounding, MLP error 2-3x RTN's."""
    cfg = ModelConfig.from_dict(
        tiny_config("llama", hidden=64, heads=4, kv_heads=2, intermediate_size=256).to_dict()
    )
    live = 128
    torch.manual_seed(0)
    layer = DecoderLayer(cfg).eval().requires_grad_(False)
    with torch.no_grad():
        for p in layer.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.02)
        mlp = layer.mlp
        mlp.up_proj.weight.normal_(0, 0.002)  # small, as the 8B's are against its larger (x300) inflation
        # a few salient intermediate channels, so that AWQ's down_proj scale is not s = 1
        mlp.gate_proj.weight[:4] *= 5
        mlp.gate_proj.weight[live:] = 0
        mlp.up_proj.weight[live:] = 0
        mlp.down_proj.weight[:, live:] = 0
    x = torch.randn(8, 32, cfg.hidden_size)
    rot = Rotary(cfg)(torch.arange(x.shape[1])[None], torch.float32)
    truth = _mlp_output(make_block(layer, x, rot))
    settings = {"bits": 4, "group_size": 32, "symmetric": symmetric}
    err = {}
    for method, quantize in (("rtn", quantize_block_rtn), ("awq", quantize_block_awq)):
        block = make_block(layer, x, rot)
        qts = quantize(block, resolve_quant({"method": method, **settings}))
        err[method] = float((_mlp_output(block) - truth).norm() / truth.norm())
    assert err["awq"] < err["rtn"], err
    s_down = qts["mlp.down_proj"].input_scale
    assert torch.equal(s_down[live:], torch.ones(256 - live))  # the pruned channels: s = 1
    assert 1 < float(s_down[:live].max()) < 10  # a real scale, not inflated (before: 45)
