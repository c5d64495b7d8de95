"""runtime/cuda_int4.py: the fragment packing against the PTX ISA's mma operand layout (CPU), and on CUDA the
kernel against the dequantized weight's product (the fake-quant reference), for every group, scale dtype,
zero-point mode, activation dtype, row count and block width it takes."""

import json
import types

import pytest
import torch

from lorafast_export.qform import QTensor, dequantize
from lorafast_export.runtime import cuda_int4
from lorafast_export.runtime.cuda_int4 import fits, pack_frags, unpack_frags

CUDA = torch.cuda.is_available()


def _qt(n, k, gs, asym, sdt, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    scales = (torch.rand(n, k // gs, generator=g) * 0.02 + 0.001) * (
        1 - 2 * (torch.rand(n, k // gs, generator=g) < 0.3)
    )
    zeros = torch.randint(0, 16, (n, k // gs), generator=g, dtype=torch.uint8) if asym else None
    if asym:
        scales = scales.abs()
    return QTensor(codes=codes, scales=scales.to(sdt), bits=4, group_size=gs, zeros=zeros)


@pytest.mark.parametrize("gs", [32, 64, 128, 256])
@pytest.mark.parametrize("n", [16, 40, 96])
def test_pack_frags_round_trips_through_the_mma_fragment_layout(gs, n):
    codes = torch.randint(0, 16, (n, 512), generator=torch.Generator().manual_seed(n + gs), dtype=torch.uint8)
    words = pack_frags(codes, gs)
    assert words.dtype == torch.int32 and words.numel() == -(-n // 16) * 16 * 512 // 8
    assert torch.equal(unpack_frags(words, n, 512, gs), codes)


def test_pack_frags_word_bits_follow_the_documented_order():
    """One lane's word, by hand: row tile 0, chunk 0, lane 4 g + q = 6 (g 1, q 2), tile t 1 at group 128
    (chunk 64): kb = 16 q + 4 t = 36; nibble p of the word's low / high half is row g + 8 (p % 2), input
    kb + 2 (p // 2) + {0, 1}."""
    codes = torch.zeros(16, 64, dtype=torch.uint8)
    g, kb = 1, 36
    vals = {(g, kb): 1, (g, kb + 1): 2, (g + 8, kb): 3, (g + 8, kb + 1): 4}
    vals.update({(g, kb + 2): 5, (g, kb + 3): 6, (g + 8, kb + 2): 7, (g + 8, kb + 3): 8})
    for (r, c), v in vals.items():
        codes[r, c] = v
    w = pack_frags(codes, 128).view(32, 4)[6, 1].item() & 0xFFFFFFFF
    nib = [(w >> (4 * i)) & 0xF for i in range(8)]
    assert nib == [1, 3, 5, 7, 2, 4, 6, 8]


def test_fits_names_what_the_kernel_takes():
    assert fits(4096, 4096, 128, 1, 8, torch.bfloat16)
    assert fits(4096, 14336, 128, 8, 8, torch.float16)
    assert not fits(4096, 4096, 128, 9, 8, torch.bfloat16)  # rows: the mma's N is 8
    assert not fits(4096, 4096, 128, 1, 8, torch.float32)
    assert not fits(4096, 4096, -1, 1, 8, torch.bfloat16)  # per channel
    assert not fits(4096, 1000, 128, 1, 4, torch.bfloat16)  # K not a multiple of 256 x warps
    assert not fits(4096, 4096, 128, 1, 4, torch.bfloat16, rpw=3)
    assert fits(4096, 4096, 128, 1, 8, torch.bfloat16, minb=8)  # 8 blocks of 256 threads: 2,048 an SM
    assert not fits(4096, 4096, 128, 1, 16, torch.bfloat16, minb=6)  # 3,072 threads an SM
    assert not fits(4096, 4096, 128, 1, 8, torch.bfloat16, minb=5)
    assert cuda_int4.layout([1, 8, 4, 0, 1, 3, cuda_int4.SUBA]) == (4, 1, 3, cuda_int4.SUBA)
    x, s = torch.zeros(1, 2048, dtype=torch.bfloat16), torch.ones(16, 16)
    with pytest.raises(ValueError, match="multiple of 256 x 16 warps"):  # it would sum nothing, not fail
        cuda_int4.mma_mm(x, torch.zeros(1024, dtype=torch.int32), s, None, 2048, 128, 16)


pytestmark_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA device")


def _check(y, x, qt, offset: bool = True):
    ref = x.double() @ dequantize(qt).double().to(x.device).T
    err = (y.double() - ref).abs()
    # the output is rounded once to bf16 / fp16 (half an ulp; one ulp allowed), plus the fp32 group sums'
    # error: with the 128 offset in them (module doc: about 1e-5 of the largest output; 4e-5 allowed), or
    # without it (SUBA: fp32 sums of exact products, 1e-6 allowed). SUBX keeps the offset in its sums.
    ulp = 2.0**-7 if y.dtype == torch.bfloat16 else 2.0**-10
    bound = ulp * ref.abs() + (4e-5 if offset else 1e-6) * ref.abs().max()
    assert bool((err <= bound).all()), f"max excess {(err - bound).max().item():.3g}"


_LAYOUTS = [(ksb, rpw) for ksb in cuda_int4.KSB_CHOICES for rpw in cuda_int4.RPW_CHOICES]


@pytestmark_cuda
@pytest.mark.parametrize("gs", [32, 64, 128, 256])
@pytest.mark.parametrize("asym", [False, True])
@pytest.mark.parametrize("sdt", [torch.float32, torch.float16, torch.bfloat16])
def test_kernel_equals_the_dequantized_product(gs, asym, sdt):
    """Every variant is compiled by NVRTC on first use (~0.5 s each), so each case runs every block layout
    (warps per block x row tiles per warp) only at group 128 with fp16 scales (the shipped tables' scheme)
    and otherwise two layouts, taken in turn from the list so that every layout meets every group."""
    n, k = 200, 2048  # N not a multiple of 16: the last tile's rows are masked; 13 row tiles: with 2 a warp,
    # the last block's second tile lies past N
    qt = _qt(n, k, gs, asym, sdt)
    frags = pack_frags(qt.codes, gs).cuda()
    s, z = qt.scales.cuda(), None if qt.zeros is None else qt.zeros.cuda()
    case = (
        [32, 64, 128, 256].index(gs) * 6
        + asym * 3
        + [torch.float32, torch.float16, torch.bfloat16].index(sdt)
    )
    every = gs == 128 and sdt == torch.float16
    layouts = _LAYOUTS if every else [_LAYOUTS[(2 * case + i) % len(_LAYOUTS)] for i in range(2)]
    for adt in (torch.bfloat16, torch.float16):
        x = torch.randn(8, k, generator=torch.Generator().manual_seed(1)).to(adt).cuda()
        for ksb, rpw in layouts:
            if not fits(n, k, gs, 8, ksb, adt, rpw):
                continue
            for m in (1, 3, 8):
                _check(cuda_int4.mma_mm(x[:m], frags, s, z, k, gs, ksb, rpw), x[:m], qt)


@pytestmark_cuda
@pytest.mark.parametrize("gs", [32, 128])
@pytest.mark.parametrize("asym", [False, True])
def test_kernel_variants_equal_the_dequantized_product(gs, asym):
    """The register cap (blocks per SM), the zero point subtracted from A (SUBA; then the sums carry no
    offset, so the bound is 40x tighter) and the offset removed once a group by the activations' group sums
    (SUBX, over SUBA where both are set) compute the same product."""
    n, k = 200, 4096  # K: 256 inputs for each of 16 warps
    qt = _qt(n, k, gs, asym, torch.float16)
    frags = pack_frags(qt.codes, gs).cuda()
    s, z = qt.scales.cuda(), None if qt.zeros is None else qt.zeros.cuda()
    for adt in (torch.bfloat16, torch.float16):
        x = torch.randn(8, k, generator=torch.Generator().manual_seed(2)).to(adt).cuda()
        for ksb, minb, bits in [
            (8, 3, 0),
            (4, 0, cuda_int4.SUBA),
            (8, 4, cuda_int4.SUBA),
            (16, 2, cuda_int4.SUBA),
            (4, 4, cuda_int4.SUBX),
            (8, 0, cuda_int4.SUBX | cuda_int4.SUBA),
        ]:
            assert fits(n, k, gs, 8, ksb, adt, 1, minb)
            for m in (1,) if bits & cuda_int4.SUBX else (1, 3, 8):  # SUBX: one row only
                y = cuda_int4.mma_mm(x[:m], frags, s, z, k, gs, ksb, 1, minb, bits)
                _check(y, x[:m], qt, offset=_offset(bits))


def _offset(bits: int) -> bool:
    """Whether a variant's fp32 sums carry the 128 offset (the looser bound of `_check`)."""
    return bool(bits & cuda_int4.SUBX) or not bits & cuda_int4.SUBA


@pytestmark_cuda
@pytest.mark.parametrize("gs", [32, 64, 256])
def test_subx_group_sums_at_every_group_size(gs):
    """SUBX's group sums span 4 (group 32) to 32 lanes (group 256): every group size, both activation dtypes,
    2 row tiles a warp, against the dequantized product, each row of x alone."""
    n, k = 200, 2048
    qt = _qt(n, k, gs, True, torch.bfloat16)
    frags, s, z = pack_frags(qt.codes, gs).cuda(), qt.scales.cuda(), qt.zeros.cuda()
    for adt in (torch.bfloat16, torch.float16):
        x = torch.randn(3, k, generator=torch.Generator().manual_seed(4)).to(adt).cuda()
        for ksb, rpw in ((4, 1), (8, 2)):
            for i in range(3):
                y = cuda_int4.mma_mm(x[i : i + 1], frags, s, z, k, gs, ksb, rpw, 0, cuda_int4.SUBX)
                _check(y, x[i : i + 1], qt, offset=True)


def test_subx_refuses_more_than_one_row():
    """SUBX sums one activation row's groups: more rows are refused, on any device, before any launch."""
    x = torch.zeros(2, 2048, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="SUBX variant takes one activation row, not 2"):
        cuda_int4.mma_mm(x, torch.zeros(1, dtype=torch.int32), torch.ones(16, 16), None, 2048, 128, 8, 1, 0,
                         cuda_int4.SUBX)  # fmt: skip
    with pytest.raises(ValueError, match="not 3"):
        cuda_int4.fused_launch(cuda_int4.O_OP, torch.zeros(3, 2048, dtype=torch.bfloat16), None,
                               torch.ones(16, 16), None, 2048, 128, (8, 0, cuda_int4.SUBX))  # fmt: skip


@pytestmark_cuda
@pytest.mark.parametrize("graph", [False, True])
def test_programmatic_dependent_launch_gives_the_same_bits(graph):
    """A chain of kernels each reading the previous one's output, every launch after the first programmatic
    (PDL: it may start before the previous kernel ends and must wait for it before reading its output or
    writing), eagerly and replayed from a CUDA graph: bit for bit the plain launches' outputs. A kernel that
    read its input before the wait would read a buffer not yet written."""
    n = k = 2048
    _, m, _ = _fused_case(n, k, True, seed=7)
    _, m2, _ = _fused_case(2 * n, k, True, seed=8)
    nw = (torch.rand(k, device="cuda") + 0.5).bfloat16()
    x0 = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    w = (m.weight_frags, m.scales, m.zeros, k, 128)

    def chain(pdl: int):
        y = cuda_int4.mma_mm(x0, *w, 8, 1, 0, cuda_int4.SUBA)
        for _ in range(6):  # each reads the previous output
            y = cuda_int4.mma_mm(y, *w, 8, 1, 0, cuda_int4.SUBA | pdl)
        r = cuda_int4.fused_launch(cuda_int4.O_OP, y, *w, (8, 0, cuda_int4.SUBA | pdl), res=y)
        g = cuda_int4.fused_launch(
            cuda_int4.GLU_OP, r, m2.weight_frags, m2.scales, m2.zeros, k, 128, (8, 0, cuda_int4.SUBA | pdl),
            nw=nw, eps=1e-5,
        )  # fmt: skip
        return [y, r, cuda_int4.mma_mm(g, *w, 8, 1, 0, cuda_int4.SUBA | pdl)]

    ref = [t.clone() for t in chain(0)]
    if graph:
        chain(cuda_int4.PDL)  # compiled and warm outside the capture
        gr = torch.cuda.CUDAGraph()
        with torch.cuda.graph(gr):
            outs = chain(cuda_int4.PDL)
        for _ in range(3):
            gr.replay()
        torch.cuda.synchronize()
    else:
        outs = chain(cuda_int4.PDL)
    for a, b in zip(outs, ref, strict=True):
        assert torch.isfinite(b.float()).all() and b.abs().max() > 0
        assert torch.equal(a, b)


@pytestmark_cuda
@pytest.mark.parametrize("bits", [0, cuda_int4.SUBA])
def test_kernel_rows_are_independent_of_the_row_count(bits):
    """Each output row depends on its own activation row only: an 8-row call (a speculative verify) equals
    eight 1-row calls bit for bit."""
    qt = _qt(4096, 4096, 128, True, torch.float16)
    frags, s, z = pack_frags(qt.codes, 128).cuda(), qt.scales.cuda(), qt.zeros.cuda()
    x = torch.randn(8, 4096, device="cuda", dtype=torch.bfloat16)
    y8 = cuda_int4.mma_mm(x, frags, s, z, 4096, 128, 8, 1, 0, bits)
    _check(y8, x, qt, offset=_offset(bits))
    for i in range(8):
        assert torch.equal(
            cuda_int4.mma_mm(x[i : i + 1], frags, s, z, 4096, 128, 8, 1, 0, bits), y8[i : i + 1]
        )


@pytestmark_cuda
def test_int4_linear_with_an_mma_plan_runs_it_and_falls_back_where_it_cannot():
    from lorafast_export.runtime import triton_int4 as t4
    from lorafast_export.runtime.linear import Int4TritonLinear

    qt = _qt(512, 1024, 128, False, torch.bfloat16)
    plan = [8, t4.MMA, 4, 0, 1, 0, 0, 1 << 30, t4.GEMM_W, 64, 0, 1, 16, 4]
    lin = Int4TritonLinear(qt, dtype=torch.bfloat16, device="cuda", plan=plan)
    assert lin.weight_frags is not None and lin.plan[1] == t4.MMA
    for m in (1, 5, 8, 16):
        x = torch.randn(m, 1024, device="cuda", dtype=torch.bfloat16)
        _check(lin(x), x, qt)
    odd = _qt(512, 1056, 32, False, torch.bfloat16)  # K not a multiple of 256 x warps: the GEMV runs
    lin = Int4TritonLinear(odd, dtype=torch.bfloat16, device="cuda", plan=plan)
    assert lin.weight_frags is None and lin.plan[1] != t4.MMA


def test_shipped_fused_layouts_fit_their_shapes():
    """Every measured fused-op layout in a shipped int4 table (its "fused_mma" section) is one the fused kernel
    takes for that shape, and the lookup returns it."""
    from lorafast_export.runtime import int4_table

    seen = 0
    for f in sorted(int4_table.TABLE_DIR.glob("int4_*.json")):
        table = json.loads(f.read_text())
        gpu = table["gpu"]
        for op, cells in table.get("fused_mma", {}).items():
            for shape, cell in cells.items():
                n, k = map(int, shape.split("x"))
                ksb, minb, bits = cell["layout"]
                assert cuda_int4.fused_fits(op, n, k, 128, ksb, minb, 128 if op == cuda_int4.QKV_OP else 0)
                assert not bits & ~(cuda_int4.SUBA | cuda_int4.SUBX)
                assert int4_table.fused_mma_layout(gpu, op, n, k) == cell["layout"]
                seen += 1
    assert seen >= 3  # the H200 table holds the 8B shapes' three ops
    assert int4_table.fused_mma_layout("NVIDIA H200", cuda_int4.GLU_OP, 64, 64) is None


def test_use_kernel_pdl_marks_every_mma_launch_on_sm90_only(monkeypatch):
    """use_kernel_pdl sets the PDL launch bit on each int4 linear's MMA plan entries (not its other entries, not
    other bits) and on each fused layer's three layouts, and marks every layer's attention, and where asked
    (dense) every layer's dense fused ops and the head, on an sm90+ CUDA device only."""
    from torch import nn

    from lorafast_export.runtime import paged
    from lorafast_export.runtime import triton_int4 as t4
    from lorafast_export.runtime.linear import Int4TritonLinear

    def decoder():
        dec = nn.Module()
        plan = [4, t4.MMA, 8, 1, 1, 2, cuda_int4.SUBA, 1 << 30, t4.GEMM, 64, 64, 1, 32, 4]
        dec.a = Int4TritonLinear(_qt(64, 1024, 128, True, torch.float16), dtype=torch.bfloat16, device="cpu")
        dec.b = Int4TritonLinear(_qt(64, 1024, 128, True, torch.float16), dtype=torch.bfloat16, device="cpu")
        dec.a.plan, dec.b.plan = plan, [1 << 30, t4.GEMM, 64, 64, 1, 32, 4]
        fused = types.SimpleNamespace(mma_fused=[[8, 0, 1], [8, 2, 1], [4, 0, 0]])
        dec.model = types.SimpleNamespace(layers=[fused, types.SimpleNamespace(mma_fused=None)])
        return dec

    for cap, want in (((9, 0), 1), ((8, 0), None)):
        monkeypatch.setattr(cuda_int4, "pdl_available", lambda d, cap=cap: cap >= (9, 0))
        dec = decoder()
        assert paged.use_kernel_pdl(dec, "cuda") == want
        bit = cuda_int4.PDL if want else 0
        assert [getattr(layer, "attn_pdl", False) for layer in dec.model.layers] == [bool(want)] * 2
        # the dense fused ops and the head (triton_fused): only with option fused_pdl (dense)
        assert not any(getattr(x, "fused_pdl", False) for x in (dec, *dec.model.layers))
        assert dec.a.plan == [4, t4.MMA, 8, 1, 1, 2, cuda_int4.SUBA | bit, 1 << 30, t4.GEMM, 64, 64, 1, 32, 4]
        assert dec.b.plan == [1 << 30, t4.GEMM, 64, 64, 1, 32, 4]
        assert dec.model.layers[0].mma_fused == [[8, 0, 1 | bit], [8, 2, 1 | bit], [4, 0, bit]]
        assert dec.model.layers[1].mma_fused is None
        dense = decoder()
        assert paged.use_kernel_pdl(dense, "cuda", dense=True) == want
        assert [getattr(x, "fused_pdl", False) for x in (dense, *dense.model.layers)] == [bool(want)] * 3
    monkeypatch.undo()
    assert paged.use_kernel_pdl(decoder(), "cpu") is None and not cuda_int4.pdl_available("cpu")


def test_a_plan_falls_back_to_the_gemv_where_the_kernel_cannot_run(monkeypatch, caplog):
    """An MMA entry becomes the default GEMV tile on the CPU, past 8 rows, with the one-row SUBX variant past one
    row, and where the kernel does not compile (logged once, with the reason), so a layer never fails in its first
    decode step."""
    from types import SimpleNamespace

    from lorafast_export.runtime import linear
    from lorafast_export.runtime.int4_table import default_plan

    t4 = SimpleNamespace(ENTRY=7, MMA=8)
    gemv = default_plan()[1:7]
    qt = _qt(64, 1024, 128, False, torch.float16)
    plan = [8, 8, 4, 1, 1, 0, 0, 1 << 30, 5, 64, 0, 1, 16, 4]
    assert linear._mma_to_gemv(plan, t4, qt, torch.bfloat16, "cpu") == [8, *gemv, *plan[7:]]
    why = cuda_int4.unready(128, 4, 1, False, torch.float16, torch.bfloat16)
    assert why is None if CUDA else "NVRTC" in why  # on CUDA the variant compiles
    monkeypatch.setattr(cuda_int4, "unready", lambda *a: "NVRTC said no")
    with caplog.at_level("WARNING", logger="lorafast_export.runtime.linear"):
        assert linear._mma_to_gemv(plan, t4, qt, torch.bfloat16, "cuda") == [8, *gemv, *plan[7:]]
        linear._mma_to_gemv(plan, t4, qt, torch.bfloat16, "cuda")
    assert [r.getMessage() for r in caplog.records].count(
        "int4 MMA kernel unavailable, the Triton GEMV runs instead: NVRTC said no"
    ) == 1
    monkeypatch.setattr(cuda_int4, "unready", lambda *a: None)
    assert linear._mma_to_gemv(plan, t4, qt, torch.bfloat16, "cuda") == plan
    past = [16, 8, 4, 1, 1, 0, 0]  # an MMA entry over more than 8 rows
    assert linear._mma_to_gemv(past, t4, qt, torch.bfloat16, "cuda") == [16, *gemv]
    subx = [1, 8, 4, 1, 1, 0, cuda_int4.SUBX, 2, 8, 4, 1, 1, 0, cuda_int4.SUBX]  # SUBX: the 1-row entry only
    assert linear._mma_to_gemv(subx, t4, qt, torch.bfloat16, "cuda") == [*subx[:7], 2, *gemv]


def _emulate_kernel(x: torch.Tensor, words: torch.Tensor, qt: QTensor) -> torch.Tensor:
    """The kernel's arithmetic in float64 on the CPU, from the PTX ISA's m16n8k16 operand layouts: lane 4 g + q's
    A registers p = 0..3 are (w >> 4 p) & 0x000F000F | bf16 128 (row g + 8 (p % 2), tile inputs 2 q + 8 (p // 2) +
    {0, 1}); its B registers b0 / b1 are the activations it loads, (CH / 4) q + 4 t + {0, 1} / {2, 3} of the chunk
    (column g = activation row); each tile adds A @ B and then a constant A of -(128 + zero) @ B, and a group's sum
    is scaled once. What it checks on the CPU: the packing's input order and the kernel's activation addressing
    agree, so each product pairs a weight with its own activation."""
    n, k, gs = qt.out_features, qt.in_features, qt.group_size
    ch, m = min(gs, 64), x.shape[0]
    t_n, rt = ch // 16, -(-n // 16)
    w = words.view(rt, k // ch, 8, 4, t_n).to(torch.int64) & 0xFFFFFFFF  # [r, chunk, g, q, t]
    a = torch.zeros(rt, k // ch, t_n, 16, 16, dtype=torch.float64)  # [.., row, tile input]
    for p in range(4):
        for e in range(2):
            nib = ((w >> (4 * p + 16 * e)) & 0xF).double() + 128  # [r, chunk, g, q, t]
            for q in range(4):
                a[:, :, :, 8 * (p % 2) : 8 * (p % 2) + 8, 2 * q + e + 8 * (p // 2)] = nib[:, :, :, q].permute(
                    0, 1, 3, 2
                )
    xb = torch.zeros(8, k, dtype=torch.float64)
    xb[:m] = x.double()
    xc = xb.view(8, k // ch, 4, t_n, 4)  # [col, chunk, q, t, j]: input chunk * ch + (ch / 4) q + 4 t + j
    b = torch.zeros(k // ch, t_n, 16, 8, dtype=torch.float64)  # [chunk, t, tile input, col]
    for q in range(4):
        for j in range(4):  # b0 holds j = 0, 1 (tile inputs 2 q + j); b1 holds j = 2, 3 (2 q + 8 + j - 2)
            b[:, :, 2 * q + j % 2 + 8 * (j // 2), :] = xc[:, :, q, :, j].permute(1, 2, 0)
    rows = torch.arange(rt * 16).clamp(max=n - 1)
    zero = (
        qt.zeros.double() if qt.zeros is not None else torch.full(qt.scales.shape, 8.0, dtype=torch.float64)
    )
    out = torch.zeros(rt * 16, 8, dtype=torch.float64)
    for c in range(k // ch):
        grp = c * ch // gs
        prod = torch.einsum("rtik,tkj->rij", a[:, c], b[c]).reshape(rt * 16, 8)
        offset = -(128 + zero[rows, grp])[:, None] * b[c].sum(dim=(0, 1))[None, :]  # the constant-A mma
        out += qt.scales.double()[rows, grp][:, None] * (prod + offset)
    return out[:n, :m].T


def _emulate_step_sums(x_step: torch.Tensor, gs: int) -> torch.Tensor:
    """SUBX's `step_sums` lane by lane, in float64: lane l sums inputs 8 l .. 8 l + 7 of the step's 256, then
    `v += __shfl_xor_sync(v, o)` for o = 1, 2, 4, ... while o < GS / 8 and o < 32 (every lane reads its partner
    before any writes), then group j's sum is read from lane (j GS / 8) & 31. Returns [256 / GS] sums."""
    v = x_step.double().view(32, 8).sum(1)
    o = 1
    while o < gs // 8 and o < 32:
        v = v + v[torch.arange(32) ^ o]
        o <<= 1
    return torch.stack([v[(j * (gs // 8)) & 31] for j in range(256 // gs)])


@pytest.mark.parametrize("gs", [32, 64, 128, 256])
def test_subx_step_sums_lanes_hold_each_groups_sum(gs):
    """The shuffle tree and the lane SUBX reads each group's sum from give the sum of that group's 256 / GS inputs,
    step by step: the index logic that the CUDA tests can only check on a GPU."""
    for line in (  # what the emulation follows, as the kernel source writes it
        "const u16* p = sx + 8 * lane;",
        "for (int o = 1; o < GS / 8 && o < 32; o <<= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, o);",
        "for (int j = 0; j < NG; ++j) sg[j] = __shfl_sync(0xFFFFFFFFu, v, (j * (GS / 8)) & 31);",
    ):
        assert line in cuda_int4.SOURCE, line
    x = torch.randn(1024, generator=torch.Generator().manual_seed(gs))
    for step in range(4):
        xs = x[256 * step : 256 * (step + 1)]
        want = xs.double().view(256 // gs, gs).sum(1)
        assert torch.allclose(_emulate_step_sums(xs, gs), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("gs", [32, 64, 128, 256])
@pytest.mark.parametrize("asym", [False, True])
def test_emulated_kernel_arithmetic_equals_the_dequantized_product(gs, asym):
    qt = _qt(40, 1024, gs, asym, torch.float32, seed=gs)
    x = torch.randn(3, 1024, generator=torch.Generator().manual_seed(2))
    z = qt.zeros.double() if asym else torch.full(qt.scales.shape, 8.0, dtype=torch.float64)
    w = (qt.codes.double() - z.repeat_interleave(gs, 1)) * qt.scales.double().repeat_interleave(gs, 1)
    want = x.double() @ w.T  # in float64: qform.dequantize rounds (code - zero) * scale to float32
    got = _emulate_kernel(x, pack_frags(qt.codes, gs), qt)
    assert torch.allclose(got, want, rtol=1e-9, atol=1e-9 * want.abs().max().item())


def _rmsnorm(x, nw, eps):
    """The decoder's RMSNorm (model/decoder.py), whose roundings the fused ops reproduce."""
    h = x.float()
    return nw * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _close(y, ref, what):
    """Within a few roundings of the activation dtype: the fused epilogues round the product (and gate / up,
    q / k) once where the plain step does, and their fp32 sums differ from the float64 reference by far less."""
    ref = ref.double()
    err = (y.double() - ref).abs()
    assert (err.norm() / ref.norm()).item() < 6e-3, (
        f"{what}: relative error {(err.norm() / ref.norm()).item():.3g}"
    )
    assert err.max().item() <= 2.0**-6 * ref.abs().max().item(), f"{what}: max error {err.max().item():.3g}"


def _fused_case(n, k, asym, seed=0):
    qt = _qt(n, k, 128, asym, torch.float16, seed)
    m = types.SimpleNamespace(
        weight_frags=pack_frags(qt.codes, 128).cuda(),
        scales=qt.scales.cuda(),
        zeros=None if qt.zeros is None else qt.zeros.cuda(),
        in_features=k,
        out_features=n,
        group_size=128,
    )
    return qt, m, dequantize(qt).double().cuda()


@pytestmark_cuda
@pytest.mark.parametrize("asym", [False, True])
@pytest.mark.parametrize("rows", [1, 8])
@pytest.mark.parametrize("bits", [cuda_int4.SUBA, cuda_int4.SUBX])
def test_fused_norm_glu_equals_rmsnorm_product_and_silu(asym, rows, bits):
    inter, k = 352, 2048  # 22 gate tiles and 22 up tiles
    _, m, wd = _fused_case(2 * inter, k, asym)
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16) * 3
    nw = (torch.rand(k, device="cuda") + 0.5).bfloat16()
    if rows > 1 and bits & cuda_int4.SUBX:
        pytest.skip("SUBX takes one row")
    lay = (8, 0, bits)
    assert cuda_int4.fused_unready(cuda_int4.GLU_OP, m, lay, torch.bfloat16) is None
    y = cuda_int4.mma_norm_glu(x, nw, m.weight_frags, m.scales, m.zeros, k, 128, list(lay), 1e-5)
    p = _rmsnorm(x, nw, 1e-5).double() @ wd.T
    g, u = p[:, :inter].bfloat16().double(), p[:, inter:].bfloat16().double()
    assert y.shape == (rows, inter)
    _close(y, g * torch.sigmoid(g) * u, "silu(gate) * up")


@pytestmark_cuda
@pytest.mark.parametrize("rows", [1, 8])
@pytest.mark.parametrize("bits", [0, cuda_int4.SUBX])
def test_fused_gemv_add_equals_product_plus_residual(rows, bits):
    n, k = 200, 4096
    _, m, wd = _fused_case(n, k, True, seed=3)
    a = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    r = torch.randn(rows, n, device="cuda", dtype=torch.bfloat16) * 4
    if rows > 1 and bits & cuda_int4.SUBX:
        pytest.skip("SUBX takes one row")
    lay = (8, 2, bits)
    assert cuda_int4.fused_unready(cuda_int4.O_OP, m, lay, torch.bfloat16) is None
    y = cuda_int4.mma_gemv_add(a, m.weight_frags, m.scales, m.zeros, k, 128, list(lay), r)
    _close(y, (a.double() @ wd.T).bfloat16().double() + r.double(), "r + a @ W^T")


@pytestmark_cuda
@pytest.mark.parametrize("hd", [64, 128])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("bits", [cuda_int4.SUBA, cuda_int4.SUBX])
def test_fused_add_norm_qkv_rope_writes_q_and_the_pools(hd, bias, bits):
    """x = h + delta, RMSNorm, the qkv product, rope on q and k heads, k and v written at each row's slot."""
    hq, hkv, k, slots_n = 4, 2, 1024, 64
    rows = 1 if bits & cuda_int4.SUBX else 5  # SUBX takes one row
    qn, kn = hq * hd, hkv * hd
    _, m, wd = _fused_case(qn + 2 * kn, k, True, seed=5)
    h = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    d = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    nw = (torch.rand(k, device="cuda") + 0.5).bfloat16()
    b = torch.randn(qn + 2 * kn, device="cuda", dtype=torch.bfloat16) if bias else None
    ang = torch.rand(rows, hd // 2, device="cuda") * 6
    cos, sin = torch.cat([ang.cos()] * 2, -1).bfloat16(), torch.cat([ang.sin()] * 2, -1).bfloat16()
    kp = torch.zeros(hkv, slots_n, hd, device="cuda", dtype=torch.bfloat16)
    vp = torch.zeros_like(kp)
    slots = torch.randperm(slots_n, device="cuda")[:rows]
    lay = (8, 0, bits)
    assert cuda_int4.fused_unready(cuda_int4.QKV_OP, m, lay, torch.bfloat16, bias, hd) is None
    x, q = cuda_int4.mma_add_norm_qkv_rope(
        h, d, nw, m.weight_frags, m.scales, m.zeros, k, 128, list(lay), 1e-6, b, cos, sin, kp, vp, slots, qn
    )
    assert torch.equal(x, h + d)  # one bf16 rounding of the fp32 sum, as torch's add
    p = _rmsnorm(x, nw, 1e-6).double() @ wd.T + (b.double() if bias else 0)
    p = p.bfloat16().double()
    c, s = cos.double(), sin.double()

    def rope(t):  # [rows, heads * hd], fp32-like math on the rounded product, as the fused epilogue
        t = t.view(rows, -1, hd)
        lo, hi = t[..., : hd // 2], t[..., hd // 2 :]
        c1, s1, c2, s2 = (
            z[:, None] for z in (c[:, : hd // 2], s[:, : hd // 2], c[:, hd // 2 :], s[:, hd // 2 :])
        )
        return torch.cat([lo * c1 - hi * s1, hi * c2 + lo * s2], -1)

    _close(q.view(rows, hq, hd), rope(p[:, :qn]), "q")
    _close(kp[:, slots].transpose(0, 1), rope(p[:, qn : qn + kn]), "k at the slots")
    _close(vp[:, slots].transpose(0, 1), p[:, qn + kn :].view(rows, hkv, hd), "v at the slots")
    others = torch.ones(slots_n, dtype=torch.bool, device="cuda")
    others[slots] = False
    assert not kp[:, others].any() and not vp[:, others].any()  # nothing written elsewhere


@pytestmark_cuda
def test_int4_decode_through_the_fused_mma_ops_gives_the_unfused_tokens(tmp_path, monkeypatch):
    """A tiny int4 model (g128 asymmetric, bf16) whose linears all run the MMA kernel: with fused decode its
    layers take the fused MMA ops (layouts derived from their plans, compiled at load), and teacher-forced decode
    steps are as close to the fake-quant model's logits (fp32) as the unfused MMA path's: the two round to bf16
    in different places (rope, the fused head), so they are compared through the reference, not with each other."""
    from lorafast_export.runtime import int4_table, linear
    from lorafast_export.runtime import triton_int4 as t4
    from lorafast_export.runtime.paged import use_fused_decode, use_kernel_pdl
    from tests.runtime.helpers import fake_quant_decoder, paged, quantize_all, tiny_checkpoint
    from tests.runtime.test_triton_fused_int4 import _teacher_forced

    plan = [8, t4.MMA, 1, 1, 1, 0, cuda_int4.SUBA, 1 << 30, t4.GEMM, 64, 64, 1, 32, 4]
    monkeypatch.setattr(linear, "default_plan", lambda: list(plan))
    measured = {cuda_int4.QKV_OP: [2, 0, 1], cuda_int4.O_OP: [1, 0, 1], cuda_int4.GLU_OP: [2, 0, 1]}
    monkeypatch.setattr(int4_table, "fused_mma_layout", lambda gpu, op, n, k: measured[op])
    md = tiny_checkpoint(tmp_path, hidden=256, intermediate_size=512)  # 4 heads of 64, 2 kv heads
    fp, q = quantize_all(md, group_size=128)
    unfused, cache = paged(md, fp, q, dtype=torch.bfloat16, kernel="triton", device="cuda")
    fused, cache2 = paged(md, fp, q, dtype=torch.bfloat16, kernel="triton", device="cuda")
    assert unfused.dec.model.layers[0].mlp.down_proj.plan[1] == t4.MMA
    assert use_fused_decode(fused.dec) == md.config.num_layers
    assert all(layer.mma_fused == list(measured.values()) for layer in fused.dec.model.layers)
    ids = torch.randint(0, 96, (10,), generator=torch.Generator().manual_seed(0))
    want, got = _teacher_forced(unfused, cache, ids, 6), _teacher_forced(fused, cache2, ids, 6)
    with torch.no_grad():
        ref = fake_quant_decoder(md, q)(ids[None])[0][0].float()
    # programmatic dependent launch of every MMA kernel (sm90+): the same logits, bit for bit
    pdl, cache3 = paged(md, fp, q, dtype=torch.bfloat16, kernel="triton", device="cuda")
    use_fused_decode(pdl.dec)
    n_pdl = use_kernel_pdl(pdl.dec, "cuda")
    assert (n_pdl is not None) == (torch.cuda.get_device_capability() >= (9, 0))
    if n_pdl is not None:
        assert all(layer.mma_fused[0][2] & cuda_int4.PDL for layer in pdl.dec.model.layers)
        assert torch.equal(_teacher_forced(pdl, cache3, ids, 6), got)
    err_fused, err_unfused = (got[6:] - ref[6:]).abs().max(), (want[6:] - ref[6:]).abs().max()
    assert err_fused <= 1.5 * err_unfused + 1e-2 * ref.abs().max(), (err_fused, err_unfused)
    assert err_fused <= 0.1 * ref.abs().max()  # bf16 through two layers: a few percent of the largest logit
    # at 8 rows (a runtime that verifies drafts) the layers keep the plain kernels, and an unmeasured shape too
    use_fused_decode(fused.dec, 8)
    assert all(layer.mma_fused is None for layer in fused.dec.model.layers)
    monkeypatch.setattr(int4_table, "fused_mma_layout", lambda gpu, op, n, k: None)
    assert use_fused_decode(fused.dec) == 0


def _kernel_params(name: str = "KNAME") -> list[str]:
    """A kernel's parameter kinds from its CUDA source ("KNAME": the fused kernel's): 'ptr', 'int' or 'double'."""
    src = cuda_int4.SOURCE
    sig = src[src.index(f"\n{name}(") + len(name) + 2 :]
    sig = sig[: sig.index(")")]
    return ["ptr" if "*" in p else "double" if "double" in p else "int" for p in sig.split(",")]


def _kinds(args) -> list[str]:
    return [
        "ptr" if isinstance(a, torch.Tensor) else "double" if isinstance(a, float) else "int" for a in args
    ]


def test_plain_launch_matches_the_kernel_signature():
    """The plain kernel's arguments have its CUDA signature's kinds and count, with the rows, N, K and groups in
    their places."""
    qt = _qt(200, 1024, 128, True, torch.float16)
    frags, x = pack_frags(qt.codes, 128), torch.zeros(3, 1024, dtype=torch.bfloat16)
    out = torch.empty(3, 200, dtype=torch.bfloat16)
    args = cuda_int4._plain_args(frags, x, qt.scales, qt.zeros, out, 200, 1024)
    assert _kinds(args) == _kernel_params("int4_mma")
    assert args[5:] == [3, 200, 1024, 1024 // 128]


def test_fused_launch_matches_the_kernel_signature_and_the_variant_compiled_at_load(monkeypatch):
    """On the CPU, with the compile and launch recorded: each fused op launches the variant that fused_unready
    compiled at load (the same `_fused` arguments), with arguments whose kinds and count are the CUDA
    signature's (a tensor for each pointer, a Python int for each int, a float for the double), its grid
    (pairs of tiles for GLU and rope), its warps and its shared memory."""
    compiled, launched = [], []

    class Kernel:
        _max_shared_mem_bytes = 0

        def set_shared_memory_config(self, n):
            self._max_shared_mem_bytes = n

        def __call__(self, grid, block, args, shared_mem=0):
            launched.append((grid, block, args, shared_mem))

    def fused(*key):
        compiled.append(key)
        return Kernel()

    monkeypatch.setattr(cuda_int4, "_fused", fused)
    monkeypatch.setattr(cuda_int4, "available", lambda: True)
    kinds = _kernel_params()
    k, hd, rows = 1024, 64, 3
    cases = {
        cuda_int4.QKV_OP: (8 * hd, (4, 0, cuda_int4.SUBA), 8 * hd // 32),
        cuda_int4.O_OP: (200, (4, 2, 0), 13),
        cuda_int4.GLU_OP: (704, (4, 0, cuda_int4.SUBA), 704 // 32),
    }
    for op, (n, lay, grid) in cases.items():
        qt = _qt(n, k, 128, True, torch.float16)
        m = types.SimpleNamespace(
            weight_frags=pack_frags(qt.codes, 128), scales=qt.scales, zeros=qt.zeros, in_features=k,
            out_features=n, group_size=128,
        )  # fmt: skip
        x = torch.zeros(rows, k, dtype=torch.bfloat16)
        kw = {}
        if op == cuda_int4.QKV_OP:
            kp = torch.zeros(2, 16, hd, dtype=torch.bfloat16)
            cos = torch.zeros(rows, hd, dtype=torch.bfloat16)
            rope = (cos, cos, kp, kp.clone(), torch.arange(rows), 4 * hd)
            kw = dict(delta=x, nw=torch.ones(k, dtype=torch.bfloat16), eps=1e-5, rope=rope)
        elif op == cuda_int4.O_OP:
            kw = dict(res=torch.zeros(rows, n, dtype=torch.bfloat16))
        else:
            kw = dict(nw=torch.ones(k, dtype=torch.bfloat16), eps=1e-5)
        assert (
            cuda_int4.fused_unready(op, m, lay, torch.bfloat16, False, hd if op == cuda_int4.QKV_OP else 0)
            is None
        )
        cuda_int4.fused_launch(op, x, m.weight_frags, m.scales, m.zeros, k, 128, lay, **kw)
        assert compiled[-2] == compiled[-1]  # the variant compiled at load is the one launched
        g, block, args, smem = launched[-1]
        assert _kinds(args) == kinds, op
        assert g == (grid, 1, 1) and block == (32 * lay[0], 1, 1)
        assert smem == (rows * k * 2 if op != cuda_int4.O_OP else 0)
