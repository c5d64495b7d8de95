"""The fused decode kernels (runtime/triton_fused.py) against the canonical decoder's modules computed in float64,
row i of a several-row call against the one-row call bit for bit, and the runtime with `fused_decode` against
the canonical decoder's greedy tokens. CUDA, or the CPU interpreter (float32 there: the interpreter's bfloat16
rounding is not round-to-nearest-even, so a bf16 check runs on CUDA only)."""
# ruff: noqa: I001 - tests.runtime.triton_device must be imported before any kernel module

import pytest
import torch
import torch.nn.functional as F

from tests.runtime.triton_device import DEV  # first: sets the interpreter flag before triton loads
from lorafast_export.model.decoder import RMSNorm, rotate_half
from lorafast_export.runtime.triton_fused import (
    DEFAULT_TILES,
    MMA_DEFAULT,
    add_norm_gemv,
    add_rms_norm,
    add_norm_gemv_launch,
    add_norm_qkv_rope,
    add_norm_qkv_rope_launch,
    fused_gemv,
    gemv_add,
    gemv_add_launch,
    gemv_launch,
    norm_glu,
    norm_glu_launch,
)
from tests.runtime.helpers import rope_inputs

DTYPES = [torch.float32] + ([torch.bfloat16] if DEV == "cuda" else [])
# the runtimes' tile on Triton's interpreter (interpreter_tiles): fewer programs, each of them Python there
INTERPRETER_TILES = (16, 64, 4, 1)
# the default, wide tiles, a ragged K
TILES = [DEFAULT_TILES, (8, 128, 4, 1), (2, 64, 4, 3), INTERPRETER_TILES]
# the tensor-core kernels' configurations (BN, BK, SPLIT, warps, stages): the default, 3 splits of a ragged K
MMA_TILES = [MMA_DEFAULT, (32, 64, 3, 4, 2)]


@pytest.fixture
def interpreter_tiles(monkeypatch):
    """On the CPU the runtime tests run the CUDA-core kernels at INTERPRETER_TILES in place of DEFAULT_TILES: the
    interpreter runs each program in Python, and the default's 4 columns a program made the speculative runtime test
    ~3.5x slower (~2 minutes). What a tile computes is the op tests' subject (both tiles are among TILES); these
    tests are about the runtimes' wiring and tokens. On CUDA the shipped tiles."""
    if DEV == "cpu":
        from lorafast_export.runtime import triton_fused

        monkeypatch.setattr(triton_fused, "DEFAULT_TILES", INTERPRETER_TILES)


def _norm(k: int, g: torch.Generator, dtype) -> RMSNorm:
    norm = RMSNorm(k, 1e-5).requires_grad_(False)
    norm.weight.data = 1 + 0.1 * torch.randn(k, generator=g)
    return norm.to(DEV, dtype)


def _tol(dtype) -> float:
    return 1e-5 if dtype == torch.float32 else 2e-2  # bf16: an ulp of the last rounding


def _close(y: torch.Tensor, ref: torch.Tensor, dtype) -> bool:
    return bool((y.double().cpu() - ref.double().cpu()).abs().max() <= _tol(dtype) * ref.abs().max().item())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tiles", TILES + MMA_TILES)
@pytest.mark.parametrize("n,k", [(64, 256), (40, 200)])
def test_add_norm_gemv_is_the_residual_add_norm_and_product(dtype, tiles, n, k):
    g = torch.Generator().manual_seed(n + k)
    h, d = (torch.randn(5, k, generator=g).to(DEV, dtype) for _ in range(2))
    w = (torch.randn(n, k, generator=g) * 0.05).to(DEV, dtype)
    norm = _norm(k, g, dtype)
    x, y = add_norm_gemv_launch(h, d, norm.weight, w, norm.eps, tiles)
    assert torch.equal(x, h + d) or dtype != torch.float32  # bf16: h + d is rounded by the kernel itself
    assert _close(x, (h.double() + d.double()), dtype)
    assert _close(y, norm(h + d).double() @ w.double().T, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,k", [(1, 256), (3, 200), (9, 64)])
def test_add_rms_norm_is_the_residual_add_and_the_decoders_norm(dtype, rows, k):
    """add_rms_norm(h, delta) against model/decoder.RMSNorm(h + delta), torch's ops: float32 to its rounding, bf16
    within one ulp of the last rounding (its sum of squares is added in another order) and mostly equal."""
    g = torch.Generator().manual_seed(rows + k)
    h, d = (torch.randn(rows, k, generator=g).to(DEV, dtype) for _ in range(2))
    norm = _norm(k, g, dtype)
    y, want = add_rms_norm(h, d, norm.weight, norm.eps), norm(h + d)
    assert y.dtype == dtype and y.shape == want.shape
    err = (y.double() - want.double()).abs()
    if dtype == torch.float32:
        assert err.max() <= 1e-6 * want.abs().max()
    else:
        assert (err <= want.double().abs() * 2**-8 + 1e-30).all() and (err == 0).double().mean() > 0.95


def test_add_rms_norm_refuses_mismatched_inputs():
    h = torch.zeros(2, 64, device=DEV)
    with pytest.raises(ValueError, match="add_rms_norm"):
        add_rms_norm(h, torch.zeros(2, 32, device=DEV), torch.ones(64, device=DEV), 1e-5)
    with pytest.raises(ValueError, match="add_rms_norm"):
        add_rms_norm(h, h, torch.ones(32, device=DEV), 1e-5)


def test_logits_past_the_fused_rows_take_the_norm_kernel(tmp_path):
    """use_fused_decode's decoder: rows the fused head does not take (here 3 > 1) get the final norm from
    add_rms_norm before the head, which equals the decoder's own logits (torch's norm) to float32 rounding; and
    the head's rows it takes stay the fused kernel's."""
    from lorafast_export.runtime.paged import logits_of, use_fused_decode
    from tests.runtime.helpers import paged, tiny_checkpoint

    md = tiny_checkpoint(tmp_path, hidden=64, intermediate_size=96)
    pm, _ = paged(md, device=DEV)
    use_fused_decode(pm.dec, rows=1)
    dec, g = pm.dec, torch.Generator().manual_seed(5)
    h, delta = (torch.randn(3, 1, 64, generator=g).to(DEV) for _ in range(2))
    want = dec.logits(h + delta)
    assert dec.norm_kernel and dec.fused_rows == 1
    got = logits_of(dec, h, delta)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    dec.norm_kernel = False
    assert torch.equal(logits_of(dec, h, delta), want)


def test_quantized_runtime_with_fused_decode_gives_the_fake_quant_tokens(tmp_path):
    """int4 layers keep the plain path under fused_decode='on', so no head is fused and every step's final norm is
    add_rms_norm's: the greedy tokens at batch 1 and 2 are the fake-quant reference decoder's."""
    from lorafast_export.runtime import loader
    from lorafast_export.runtime.options import RuntimeOptions
    from tests.runtime.helpers import fake_quant_decoder, greedy_reference, quantize_all, tiny_checkpoint

    md = tiny_checkpoint(tmp_path)
    fp, q = quantize_all(md)
    opts = RuntimeOptions(compile="off", fused_decode="on", max_seq_len=32, max_batch=2, batch_buckets=(1, 2))
    rt = loader.build_runtime(md.config, fp, q, DEV, torch.float32, opts)
    assert rt.model.dec.norm_kernel and rt.model.dec.fused_rows == 0
    prompts = [[5, 9, 1, 44, 3, 17, 2, 8, 60], [7, 7]]
    want = [greedy_reference(fake_quant_decoder(md, q), p, 5) for p in prompts]
    assert [rt.generate_batch([p], 5)[0] for p in prompts] == want
    assert rt.generate_batch(prompts, 5) == want


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tiles", TILES + MMA_TILES)
def test_gemv_add_and_gemv(dtype, tiles):
    g = torch.Generator().manual_seed(3)
    a, w, r = torch.randn(4, 200, generator=g), torch.randn(72, 200, generator=g) * 0.05, torch.randn(4, 72)
    a, w, r = a.to(DEV, dtype), w.to(DEV, dtype), r.to(DEV, dtype)
    prod = a.double() @ w.double().T
    assert _close(gemv_launch(a, w, tiles), prod, dtype)
    assert _close(gemv_add_launch(a, w, r, tiles), r.double() + prod, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tiles", TILES + MMA_TILES)
def test_norm_glu_is_the_mlps_first_half(dtype, tiles):
    """silu(gate) * up of RMSNorm(x) through the fused [gate; up] weight, as runtime/paged.py's run_mlp."""
    g = torch.Generator().manual_seed(4)
    k, inter = 192, 80
    x = torch.randn(3, k, generator=g).to(DEV, dtype)
    w = (torch.randn(2 * inter, k, generator=g) * 0.05).to(DEV, dtype)
    norm = _norm(k, g, dtype)
    gate, up = (norm(x).double() @ w.double().T).chunk(2, dim=-1)
    assert _close(norm_glu_launch(x, norm.weight, w, norm.eps, tiles), F.silu(gate) * up, dtype)


def _qkv_case(g, dtype, rows=3, hq=4, hkv=2, d=16, k=96, slots=40, bias=False):
    """A [q; k; v] projection with its inputs, rows at scattered positions and slots, zeroed pools."""
    h, dl = (torch.randn(rows, k, generator=g).to(DEV, dtype) for _ in range(2))
    w = (torch.randn((hq + 2 * hkv) * d, k, generator=g) * 0.05).to(DEV, dtype)
    b = (torch.randn(w.shape[0], generator=g) * 0.1).to(DEV, dtype) if bias else None
    cos, sin, slot, kp, vp = rope_inputs(g, rows, hkv, d, slots, dtype, DEV)
    return h, dl, w, b, cos, sin, kp, vp, slot


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tiles", TILES + MMA_TILES)
@pytest.mark.parametrize("bias", [False, True])
def test_add_norm_qkv_rope_is_the_layers_first_half(dtype, tiles, bias):
    """x = h + delta, qkv = RMSNorm(x) @ w^T (+ bias), rope (the decoder's rotate_half) on q and k, k and v in the
    pools at the rows' slots and nothing else of the pools touched, against float64; GQA (4 q heads, 2 kv)."""
    g = torch.Generator().manual_seed(11 + bias)
    hq, hkv, d = 4, 2, 16
    h, dl, w, b, cos, sin, kp, vp, slot = _qkv_case(g, dtype, hq=hq, hkv=hkv, d=d, bias=bias)
    norm = _norm(h.shape[1], g, dtype)
    x, q = add_norm_qkv_rope_launch(h, dl, norm.weight, w, norm.eps, b, cos, sin, kp, vp, slot, hq * d, tiles)
    assert _close(x, h.double() + dl.double(), dtype)
    qkv = norm(h + dl).double() @ w.double().T + (b.double() if bias else 0)
    rows = h.shape[0]

    def rope(t, heads):  # [rows, heads * d] → [rows, heads, d]
        t = t.view(rows, heads, d)
        return t * cos.double()[:, None] + rotate_half(t) * sin.double()[:, None]

    qr, kr = rope(qkv[:, : hq * d], hq), rope(qkv[:, hq * d : (hq + hkv) * d], hkv)
    vr = qkv[:, (hq + hkv) * d :].view(rows, hkv, d)
    assert _close(q.view(rows, hq, d), qr, dtype)
    assert _close(kp[:, slot].transpose(0, 1), kr, dtype)
    assert _close(vp[:, slot].transpose(0, 1), vr, dtype)
    untouched = torch.ones(kp.shape[1], dtype=torch.bool)
    untouched[slot.cpu()] = False
    assert not kp[:, untouched.to(DEV)].any() and not vp[:, untouched.to(DEV)].any()


def test_add_norm_qkv_rope_refuses_a_pool_of_another_shape():
    g = torch.Generator().manual_seed(12)
    h, dl, w, b, cos, sin, kp, vp, slot = _qkv_case(g, torch.float32)
    nw = torch.ones(h.shape[1], device=DEV)
    with pytest.raises(ValueError, match="k pool"):
        add_norm_qkv_rope_launch(h, dl, nw, w, 1e-5, b, cos, sin, kp[:1], vp, slot, 64, DEFAULT_TILES)


@pytest.mark.parametrize("tiles", TILES[:2] + MMA_TILES)
def test_rows_are_independent_of_the_other_rows(tiles):
    """Row i of a 6-row call equals the 1-row call bit for bit, for every op: a verify row is a decode step. The
    tensor-core kernels too (their rows are columns of one MMA, padded to 16)."""
    g = torch.Generator().manual_seed(5)
    dtype = torch.bfloat16 if DEV == "cuda" else torch.float32
    k, n = 256, 48
    h, d, r = (torch.randn(6, k, generator=g).to(DEV, dtype) for _ in range(3))
    w, w2 = (torch.randn(m, k, generator=g).to(DEV, dtype) * 0.05 for m in (n, 2 * n))
    sq = (torch.randn(k, k, generator=g) * 0.05).to(DEV, dtype)
    nw = _norm(k, g, dtype).weight
    calls = [
        lambda i: add_norm_gemv_launch(h[i], d[i], nw, w, 1e-5, tiles)[1],
        lambda i: gemv_add_launch(h[i], sq, r[i], tiles),
        lambda i: norm_glu_launch(h[i], nw, w2, 1e-5, tiles),
        lambda i: gemv_launch(h[i], w, tiles),
        lambda i: rope_call(i),
    ]
    rg = torch.Generator().manual_seed(13)
    _, _, wq, _, cos, sin, kp, vp, slot = _qkv_case(rg, dtype, rows=6, k=k)

    def rope_call(i):  # q, then the k and v it wrote
        x, q = add_norm_qkv_rope_launch(
            h[i], d[i], nw, wq, 1e-5, None, cos[i], sin[i], kp, vp, slot[i], 64, tiles
        )
        return torch.cat(
            [q, kp[:, slot[i]].transpose(0, 1).flatten(1), vp[:, slot[i]].transpose(0, 1).flatten(1)], 1
        )

    for call in calls:
        six = call(slice(0, 6))
        for i in range(6):
            assert torch.equal(call(slice(i, i + 1))[0], six[i])


def test_ops_refuse_more_than_8_rows():
    x, w = torch.zeros(9, 64, device=DEV), torch.zeros(8, 64, device=DEV)
    with pytest.raises(ValueError, match="at most 8 rows"):
        fused_gemv(x, w)


def test_ops_use_their_shipped_tiles():
    """The registered ops (what torch.compile sees) give the launch functions' results with fused_config's tiles."""
    from lorafast_export.runtime.triton_fused import fused_config

    g = torch.Generator().manual_seed(6)
    h, d = (torch.randn(2, 128, generator=g).to(DEV) for _ in range(2))
    w, w2 = torch.randn(32, 128, generator=g).to(DEV), torch.randn(64, 128, generator=g).to(DEV)
    nw = torch.ones(128, device=DEV)
    eye = torch.eye(128, device=DEV)
    t = fused_config("add_norm_gemv", 32, 128)
    assert torch.equal(add_norm_gemv(h, d, nw, w, 1e-5)[1], add_norm_gemv_launch(h, d, nw, w, 1e-5, t)[1])
    t = fused_config("gemv_add", 128, 128)
    assert torch.equal(gemv_add(h, eye, d), gemv_add_launch(h, eye, d, t))
    t = fused_config("norm_glu", 64, 128)
    assert torch.equal(norm_glu(h, nw, w2, 1e-5), norm_glu_launch(h, nw, w2, 1e-5, t))
    assert torch.equal(fused_gemv(h, w), gemv_launch(h, w, fused_config("gemv", 32, 128)))
    _, _, wq, _, cos, sin, kp, vp, slot = _qkv_case(g, torch.float32, rows=2, k=128)
    kp2, vp2 = kp.clone(), vp.clone()
    t = fused_config("add_norm_qkv_rope", *wq.shape)
    x, q = add_norm_qkv_rope(h, d, nw, wq, 1e-5, None, cos, sin, kp, vp, slot, 64)
    x2, q2 = add_norm_qkv_rope_launch(h, d, nw, wq, 1e-5, None, cos, sin, kp2, vp2, slot, 64, t)
    assert torch.equal(q, q2) and torch.equal(kp, kp2) and torch.equal(vp, vp2)


def test_pdl_launch_prefetches_only_whole_aligned_rows():
    """A programmatic dependent launch asks L2 for a program's weight rows only where they are BN consecutive
    rows cut into one 16-byte multiple a thread (its `piece`): a masked tile or rows of another width still
    launches as PDL (it waits for the kernel before it), without the prefetch."""
    from lorafast_export.runtime.triton_fused import pdl_launch

    w = torch.zeros(64, 4096, dtype=torch.bfloat16)
    assert pdl_launch(False, w, 4, 128, True) == {"PDL": False, "PF": 0, "piece": 0}
    assert pdl_launch(True, w, 4, 128, True) == {"PDL": True, "PF": 128, "piece": 256, "launch_pdl": True}
    assert pdl_launch(True, w, 1, 256, True)["piece"] == 32  # o_proj's tile: 8 KB a program, 32 B a thread
    assert pdl_launch(True, w, 4, 128, False)["PF"] == 0  # a masked tile, or rope pairs across half heads
    assert pdl_launch(True, torch.zeros(8, 200, dtype=torch.bfloat16), 1, 128, True)["PF"] == 0  # 400 B a row
    # 2 bytes off 16-byte alignment
    shifted = torch.zeros(64 * 4096 + 1, dtype=torch.bfloat16)[1:].view(64, 4096)
    assert pdl_launch(True, shifted, 1, 32, True)["PF"] == 0


def test_every_op_passes_pdl_to_its_launch_with_the_prefetch_at_8b_shapes(monkeypatch):
    """Each registered op with pdl=True reaches the kernel launch as a programmatic dependent launch that asks L2
    for its rows, with its shipped tile, at a Llama-3-8B layer's shapes and the lm_head's (the kernel itself is
    replaced by a recorder: the interpreter cannot run the PTX; the CUDA test below runs it)."""
    from lorafast_export.runtime import triton_fused as tf

    seen = []

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **kw: seen.append((kw["BN"], kw["num_warps"], kw))

    monkeypatch.setattr(tf, "_fused_kernel", Recorder())
    bf = dict(dtype=torch.bfloat16)
    x, nw = torch.zeros(1, 4096, **bf), torch.ones(4096, **bf)
    kp = torch.zeros(8, 16, 128, **bf)
    cos = torch.zeros(1, 128, **bf)
    slots = torch.zeros(1, dtype=torch.long)
    tf.add_norm_qkv_rope(
        x, x, nw, torch.zeros(6144, 4096, **bf), 1e-5, None, cos, cos, kp, kp, slots, 4096, True
    )
    tf.gemv_add(x, torch.zeros(4096, 4096, **bf), x, True)
    tf.norm_glu(x, nw, torch.zeros(28672, 4096, **bf), 1e-5, True)
    tf.fused_gemv(torch.zeros(1, 14336, **bf), torch.zeros(4096, 14336, **bf), True)
    tf.add_norm_gemv(x, x, nw, torch.zeros(128256, 4096, **bf), 1e-5, True)
    assert len(seen) == 5
    for bn, warps, kw in seen:
        assert kw["PDL"] and kw["launch_pdl"] and kw["PF"] == 32 * warps
        assert kw["piece"] * kw["PF"] == bn * kw["ITERS"] * kw["BK"] * 2  # the program's rows, every byte
    seen.clear()
    tf.gemv_add(x, torch.zeros(4096, 4096, **bf), x)  # the default: a plain launch
    assert not seen[0][2]["PDL"] and "launch_pdl" not in seen[0][2]


@pytest.mark.skipif(DEV != "cuda" or torch.cuda.get_device_capability() < (9, 0), reason="PDL needs sm90+")
@pytest.mark.parametrize("graph", [False, True])
def test_programmatic_dependent_launch_gives_the_same_bits(graph):
    """A decoder layer's dense ops, its paged attention and the head at an 8B layer's widths, chained as a decode
    step chains them (each reads the previous one's output), every launch after the first a programmatic
    dependent launch (the fused ops asking L2 for their weights before they wait, the attention's kernels letting
    the next launch early), eagerly and replayed from a CUDA graph: bit for bit the plain launches' outputs. An op
    that read its activations before the wait would read a buffer not yet written."""
    from lorafast_export.runtime.triton_attention import paged_decode
    from lorafast_export.runtime.triton_fused import pdl_launch

    g = torch.Generator().manual_seed(25)
    k, n_q, n_kv, d_head, inter, vocab = 4096, 4096, 1024, 128, 14336, 32000

    def rnd(*shape, s=0.02):
        return (torch.randn(*shape, generator=g) * s).to(DEV, torch.bfloat16)

    w_qkv, w_o, w_gu, w_down, w_head = (
        rnd(n_q + n_kv, k),
        rnd(k, n_q),
        rnd(2 * inter, k),
        rnd(k, inter),
        rnd(vocab, k),
    )
    nw1, nw2, nwf = (1 + rnd(k, s=0.1) for _ in range(3))
    assert all(pdl_launch(True, w, 1, 128, True)["PF"] for w in (w_qkv, w_o, w_gu, w_down, w_head))
    h0, d0 = rnd(1, k, s=1.0), rnd(1, k, s=1.0)
    slots, n_slots = torch.tensor([5], device=DEV), 64
    pos = torch.tensor([37.0])
    inv = 1.0 / (10000 ** (torch.arange(0, d_head, 2).float() / d_head))
    ang = torch.cat([pos[:, None] * inv] * 2, -1)
    cos, sin = ang.cos().to(DEV, torch.bfloat16), ang.sin().to(DEV, torch.bfloat16)

    kp0, vp0 = (rnd(n_kv // 2 // d_head, n_slots, d_head, s=1.0) for _ in range(2))
    tables = torch.arange(4, device=DEV, dtype=torch.int32)[None]  # 4 blocks of 16 tokens: slots 0-63
    lens = torch.tensor([6], device=DEV)  # five past tokens and the new one, at slot 5

    def step(pdl: bool):
        kp, vp = kp0 * 1, vp0 * 1
        h, d = h0 * 2, d0 * 1  # written by the kernels just before
        x, q = add_norm_qkv_rope(h, d, nw1, w_qkv, 1e-5, None, cos, sin, kp, vp, slots, n_q, pdl)
        a = paged_decode(q.view(1, -1, d_head), kp, vp, tables, lens, 16, 0, 0, pdl, pdl).view(1, n_q)
        r = gemv_add(a, w_o, x, pdl)
        act = norm_glu(r, nw2, w_gu, 1e-5, pdl)
        out = fused_gemv(act, w_down, pdl)
        _, logits = add_norm_gemv(r, out, nwf, w_head, 1e-5, pdl)
        return [x, q, kp, vp, a, r, act, out, logits]

    want = [t.clone() for t in step(False)]
    if graph:
        step(True)  # compiled and warm outside the capture
        gr = torch.cuda.CUDAGraph()
        with torch.cuda.graph(gr):
            got = step(True)
        for _ in range(3):
            gr.replay()
        torch.cuda.synchronize()
    else:
        got = step(True)
    for a, b in zip(got, want, strict=True):
        assert torch.isfinite(b.float()).all() and b.abs().max() > 0
        assert torch.equal(a, b)


# fused_pdl: on sm90+ CUDA the fused ops as PDL launches (a no-op elsewhere)
@pytest.mark.parametrize("mode,fused_pdl", [("on", False), ("on", True), ("mma", False)])
@pytest.mark.parametrize("family", ["llama", "qwen2"])  # qwen2: the qkv bias added after the fused product
def test_runtime_with_fused_decode_gives_the_reference_tokens(
    tmp_path, interpreter_tiles, family, mode, fused_pdl
):
    """fused_decode='on': batch-1 decode steps run the fused kernels in every layer and the head; the batch-2
    steps and the prefills run the plain path. 'mma' (auto's choice on an H100): the tensor-core kernels, batch-2
    steps too. Greedy tokens equal the canonical decoder's."""
    from lorafast_export.model.decoder import load_decoder
    from lorafast_export.runtime import loader
    from lorafast_export.runtime.options import RuntimeOptions
    from tests.runtime.helpers import fp_state, greedy_reference, tiny_checkpoint

    start = {"on": 0, "mma": 1}[mode]
    md = tiny_checkpoint(tmp_path, family)
    opts = RuntimeOptions(
        compile="off",
        fused_decode=mode,
        max_seq_len=32,
        max_batch=2,
        batch_buckets=(1, 2),
        fused_pdl=fused_pdl,
    )
    rt = loader.build_runtime(md.config, fp_state(md), None, DEV, torch.float32, opts)
    dec = rt.model.dec
    rows = 8 if start else 1
    assert dec.fused_rows == rows and all(layer.fused_rows == rows for layer in dec.model.layers)
    assert dec.fused_mma == start and all(layer.fused_mma == start for layer in dec.model.layers)
    sm90 = DEV == "cuda" and torch.cuda.get_device_capability() >= (9, 0)
    assert getattr(dec, "fused_pdl", False) == (fused_pdl and sm90)
    prompts = [[5, 9, 1, 44, 3, 17, 2, 8, 60], [7, 7]]
    ref = load_decoder(md)
    want = [greedy_reference(ref, p, 5) for p in prompts]
    assert [rt.generate_batch([p], 5)[0] for p in prompts] == want  # batch 1: fused
    assert rt.generate_batch(prompts, 5) == want  # batch 2: the plain path ('mma': fused)


@pytest.mark.parametrize("mode,overlap", [("on", False), ("mma", False), ("mma", True)])
def test_speculative_runtime_with_fused_decode_gives_its_greedy_tokens(
    tmp_path, interpreter_tiles, mode, overlap
):
    """With a draft, the fused kernels take up to 8 rows (a verify's tokens), so the speculative output is the
    greedy output of the model alone, token for token, and it speculated. 'mma': the model alone (same option)
    decodes through the same tensor-core kernels, and gives the same tokens. overlap: rounds chained on the
    device (option overlap_rounds)."""
    from lorafast_export.model.decoder import load_decoder
    from lorafast_export.runtime import loader
    from lorafast_export.runtime.options import RuntimeOptions
    from tests.runtime.helpers import fp_state, greedy_reference, tiny_checkpoint

    md = tiny_checkpoint(tmp_path, hidden=64, intermediate_size=96)
    opts = RuntimeOptions(
        compile="off",
        fused_decode=mode,
        max_seq_len=32,
        max_batch=1,
        batch_buckets=(1,),
        spec_k=2,
        speculation="always",  # every step a round (auto would time plain steps first)
        overlap_rounds=overlap,
    )
    draft = loader.build_runtime(md.config, fp_state(md), None, DEV, torch.float32, opts)
    rt = loader.build_runtime(md.config, fp_state(md), None, DEV, torch.float32, opts, draft=draft)
    assert rt.model.dec.fused_rows == 8 and draft.model.dec.fused_rows == (8 if mode == "mma" else 1)
    prompt, new = [5, 9, 1, 44, 3, 17, 2, 8, 60], 12
    alone = draft.generate_batch([prompt], new)  # the same options without a draft
    assert rt.generate_batch([prompt], new) == alone == [greedy_reference(load_decoder(md), prompt, new)]
    assert rt.engine.stats.accepted > 0 and (rt.engine.stats.queued_rounds > 0) == overlap


def test_auto_on_an_h100_gives_runtimes_with_and_without_a_draft_the_same_kernels(tmp_path, monkeypatch):
    """The loader's wiring of fused_decode=auto on an H100 (its name and CUDA stood in for; the kernels run where the
    tests run): the runtimes loaded with and without a draft both take the tensor cores at every row (a verify's 8
    rows included), so the speculative tokens are the draft-less runtime's, here the canonical decoder's greedy
    tokens (the draft is the model itself, so every token is accepted)."""
    from lorafast_export.model.decoder import load_decoder
    from lorafast_export.runtime import loader
    from lorafast_export.runtime.options import RuntimeOptions
    from tests.runtime.helpers import fp_state, greedy_reference, tiny_checkpoint

    real = loader.fused_mma_from
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(
        loader, "fused_mma_from", lambda o, d: real(o.replace(fused_decode="auto"), torch.device("cuda"))
    )
    md = tiny_checkpoint(tmp_path, hidden=64, intermediate_size=96)
    opts = RuntimeOptions(
        compile="off",
        fused_decode="on",  # fused here as auto fuses on CUDA; the choice of kernels is auto's (above)
        max_seq_len=32,
        max_batch=1,
        batch_buckets=(1,),
        spec_k=2,
        speculation="always",
    )
    alone = loader.build_runtime(md.config, fp_state(md), None, DEV, torch.float32, opts)
    rt = loader.build_runtime(md.config, fp_state(md), None, DEV, torch.float32, opts, draft=alone)
    for dec in (alone.model.dec, rt.model.dec):
        assert dec.fused_mma == 1 and dec.fused_rows == 8
        assert all(layer.fused_mma == 1 and layer.fused_rows == 8 for layer in dec.model.layers)
    prompt, new = [5, 9, 1, 44, 3, 17, 2, 8, 60], 12
    want = greedy_reference(load_decoder(md), prompt, new)
    assert rt.generate_batch([prompt], new) == alone.generate_batch([prompt], new) == [want]
    assert rt.engine.stats.accepted > 0


def test_fused_decode_leaves_quantized_layers_alone(tmp_path):
    """A layer with a quantized linear is not fusable: it keeps the plain path, and so does the head."""
    from lorafast_export.runtime.paged import fusable_layer, use_fused_decode
    from tests.runtime.helpers import paged, quantize_all, tiny_checkpoint

    md = tiny_checkpoint(tmp_path)
    fp, q = quantize_all(md)
    pm, _ = paged(md, fp, q, device=DEV)
    assert use_fused_decode(pm.dec) == 0
    assert not pm.dec.fused_rows and not any(fusable_layer(layer) for layer in pm.dec.model.layers)


@pytest.mark.parametrize("mma", [False, True])
def test_verify_rows_equal_single_decode_steps_with_fused_decode(tmp_path, mma):
    """A speculative verify (3 tokens in one extend) through the fused kernels (FMA or tensor-core) and the
    Triton decode attention gives each token the logits of a one-token decode step at its position, bit for
    bit."""
    from lorafast_export.runtime.paged import use_fused_decode
    from tests.runtime.helpers import paged, tiny_checkpoint, verify_and_steps

    md = tiny_checkpoint(tmp_path, hidden=64, intermediate_size=96)
    pm, cache = paged(md, attention="triton", block_size=16, num_blocks=8, device=DEV)
    assert use_fused_decode(pm.dec, rows=8, mma=mma) == md.config.num_layers
    verify, steps = verify_and_steps(pm, cache, DEV)
    assert all(torch.equal(verify[j], steps[j]) for j in range(len(steps)))


def test_the_two_kinds_of_fused_kernels_round_differently(tmp_path):
    """use_fused_decode with mma off (the CUDA-core kernels at one row) and on (the tensor cores at every row): one-row
    steps and a 3-row extend give different logits here, which is why a runtime's kernels must not depend on whether
    it has a draft (loader.fused_mma_from)."""
    from lorafast_export.runtime.paged import use_fused_decode
    from tests.runtime.helpers import paged, tiny_checkpoint, verify_and_steps

    md = tiny_checkpoint(tmp_path, hidden=64, intermediate_size=96)
    got = {}
    for mma in (False, True):
        pm, cache = paged(md, attention="triton", block_size=16, num_blocks=8, device=DEV)
        assert use_fused_decode(pm.dec, rows=1, mma=mma) == md.config.num_layers
        assert pm.dec.fused_rows == (8 if mma else 1)
        got[mma] = verify_and_steps(pm, cache, DEV)
    (v0, s0), (v1, s1) = got[False], got[True]
    assert not all(torch.equal(a, b) for a, b in zip(s0, s1, strict=True)) and not torch.equal(v0, v1)


def test_fused_mma_from_is_auto_on_a_measured_gpu(monkeypatch):
    """loader.fused_mma_from: the tensor cores at every row for fused_decode=mma, and for auto on a GPU of
    MMA_AUTO_GPUS (an H100); never for on, off, another GPU or the CPU."""
    from lorafast_export.runtime import loader
    from lorafast_export.runtime.options import RuntimeOptions

    name = {"value": "NVIDIA H100 80GB HBM3"}
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name["value"])
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert loader.fused_mma_from(RuntimeOptions(fused_decode="mma"), cpu) == 1
    assert loader.fused_mma_from(RuntimeOptions(fused_decode="auto"), cuda) == 1
    assert loader.fused_mma_from(RuntimeOptions(fused_decode="on"), cuda) == 0
    assert loader.fused_mma_from(RuntimeOptions(fused_decode="off"), cuda) == 0
    assert loader.fused_mma_from(RuntimeOptions(fused_decode="auto"), cpu) == 0
    for other in ("NVIDIA H200", "NVIDIA A100-SXM4-80GB"):  # not timed: the CUDA-core kernels stay
        name["value"] = other
        assert loader.fused_mma_from(RuntimeOptions(fused_decode="auto"), cuda) == 0
