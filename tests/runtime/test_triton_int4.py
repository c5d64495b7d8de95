"""Our Triton int4 GEMV/GEMM equal the fake-quant reference (qform.QLinear: dequantize, then matmul).

Runs on CUDA, or on the CPU through Triton's interpreter (tests/runtime/triton_device.py)."""
# ruff: noqa: I001 - tests.runtime.triton_device must be imported before any kernel module

import json

import pytest
import torch

from tests.runtime.triton_device import DEV  # first: sets the interpreter flag before triton loads
from lorafast_export.qform import QLinear, pack_nibbles
from lorafast_export.runtime import cuda_int4, int4_table
from lorafast_export.runtime.linear import Int4TritonLinear, lower_qtensor
from lorafast_export.qform import dequantize
from lorafast_export.runtime.triton_int4 import (
    DEQUANT,
    ENTRY,
    GEMM,
    GEMM_T,
    GEMM_W,
    GEMV,
    GEMV_W,
    GEMV_T,
    MMA,
    TINYGEMM,
    dequant_words,
    launch,
    pack_scale_zero,
    pack_tiles,
    pack_words,
)
from tests.quant.helpers import random_qtensor
from tests.runtime.helpers import fake_quant_decoder, paged, quantize_all, tiny_checkpoint
from tests.runtime.test_model import paged_logits

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}  # relative to the output's largest value


def _close(out: torch.Tensor, ref: torch.Tensor, dtype) -> bool:
    return (out.float().cpu() - ref).abs().max().item() <= TOL[dtype] * ref.abs().max().item()


def _dtypes():
    return [torch.float32, torch.bfloat16] if DEV == "cuda" else [torch.float32]


SCHEMES = [  # out, in, group, symmetric, act_order
    (48, 256, 128, True, False),
    (40, 256, 64, False, True),
    (56, 176, 32, False, False),  # 5.5 groups: the last one ragged, the last tile masked
    (24, 512, 128, False, False),
]


@pytest.mark.parametrize("out_f,in_f,group,sym,act_order", SCHEMES)
@pytest.mark.parametrize("rows", [1, 3, 9, 20])  # the default plan: GEMV up to 4 rows, GEMM beyond
def test_triton_linear_matches_fake_quant(out_f, in_f, group, sym, act_order, rows):
    qt = random_qtensor(out_f, in_f, 4, group, sym, act_order=act_order, seed=rows, bias=True)
    assert_lowered_matches(qt, rows, "int4_triton")


def assert_lowered_matches(qt, rows: int, kernel: str) -> None:
    """lower_qtensor(kernel=triton) picks `kernel` and equals the fake-quant reference in every dtype."""
    x = torch.randn(rows, qt.in_features)
    ref = QLinear(qt)(x)
    for dtype in _dtypes():
        mod = lower_qtensor(qt, DEV, dtype, prefer="triton")
        assert mod.kernel == kernel
        assert _close(mod(x.to(DEV, dtype)), ref, dtype)


ENTRIES = [  # (max rows, kind, BN, BK, splits, BM, warps): split-K, tiles wider than N, groups per tile
    [8, GEMV, 16, 128, 3, 16, 4],
    [8, GEMV, 64, 256, 2, 16, 8],
    [64, GEMM, 16, 32, 4, 16, 4],
    [64, GEMM, 32, 128, 2, 32, 4],
]


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("sym", [True, False])
def test_kernel_tiles_and_splits(entry, sym):
    qt = random_qtensor(40, 384, 4, 32, sym, seed=7)
    x = torch.randn(5, 384)
    ref = QLinear(qt)(x)
    w, s = pack_nibbles(qt.codes).to(DEV), qt.scales.to(DEV)
    z = None if sym else qt.zeros.to(DEV)
    for dtype in _dtypes():
        assert _close(launch(x.to(DEV, dtype), w, s, z, 384, 32, entry), ref, dtype)


TILED = [  # (entry, group, in): the tiled layout's kernels; tiles of min(group, 128) columns
    ([8, GEMV_T, 16, 0, 3, 16, 4], 32, 176),  # 5.5 groups: the last tile padded, its activations masked
    ([8, GEMV_T, 64, 0, 1, 16, 8], 256, 384),  # two tiles per group, the last group ragged
    ([64, GEMM_T, 16, 0, 2, 16, 4], 64, 384),  # scale on the tile's partial sum
    ([64, GEMM_T, 32, 1, 4, 32, 4], 128, 384),  # scale on every weight before the dot
    ([64, GEMM_T, 16, 5, 1, 16, 4], 32, 176),  # and two pipeline stages
    ([8, GEMV_T, 32, 16, 2, 16, 4], 64, 384),  # two tiles per loop iteration, the last step half empty
    ([64, GEMM_T, 16, 33, 2, 16, 4], 32, 176),  # four tiles per loop iteration
    ([64, GEMM_T, 64, 64, 2, 16, 4], 128, 384),  # nibbles by inline PTX (on CUDA; the interpreter: fp32 path)
    ([64, GEMM_T, 16, 65, 1, 16, 4], 32, 176),  # the same, scale per weight
]


@pytest.mark.parametrize("entry,group,in_f", TILED)
@pytest.mark.parametrize("sym", [True, False])
def test_tiled_kernels(entry, group, in_f, sym):
    """GEMV_T / GEMM_T on `pack_tiles` codes equal the fake-quant reference (symmetric: zero 8, scales of
    both signs; asymmetric: a zero point per group), at a row count that pads the tile's rows."""
    qt = random_qtensor(40, in_f, 4, group, sym, seed=in_f + group)
    x = torch.randn(5, in_f)
    ref = QLinear(qt)(x)
    w, s = pack_tiles(qt.codes, group).to(DEV), qt.scales.to(DEV)
    z = None if sym else qt.zeros.to(DEV)
    for dtype in _dtypes():
        assert _close(launch(x.to(DEV, dtype), w, s, z, in_f, group, entry), ref, dtype)


def test_pack_tiles_layout():
    """Byte j of a tile holds column j (low nibble) and column T/2 + j (high nibble); the tiles of 32
    consecutive rows are stored together, tile after tile; a ragged last tile or block is padded with 0."""
    codes = torch.randint(0, 16, (40, 80), dtype=torch.uint8)
    packed = pack_tiles(codes, 32).view(-1)  # tiles of 32 columns: 2.5 tiles, padded to 3; 40 rows to 64
    assert packed.numel() == 64 * 48

    def tile(block, t):  # [32 rows, 16 bytes]
        start = (block * 3 + t) * 32 * 16
        return packed[start : start + 32 * 16].view(32, 16)

    assert torch.equal(tile(0, 1) & 0xF, codes[:32, 32:48]) and torch.equal(
        tile(0, 1) >> 4, codes[:32, 48:64]
    )
    assert torch.equal(tile(1, 2)[:8] & 0xF, codes[32:, 64:80]) and not (tile(1, 2) >> 4).any()
    assert not tile(1, 0)[8:].any()  # rows 40..63: padding


WORDS = [  # (entry, group, in): GEMM_W on `pack_words` codes; tiles of 128 columns inside one group
    ([64, GEMM_W, 16, 0, 1, 16, 4], 128, 384),  # scale on the tile's partial sum, every tile full
    ([64, GEMM_W, 32, 1, 2, 16, 4], 256, 512),  # scale per weight, two splits, two tiles per group
    ([64, GEMM_W, 16, 0, 2, 16, 4], 128, 320),  # 2.5 groups: the last tile padded, its activations masked
    ([64, GEMM_W, 64, 5, 4, 32, 4], 128, 384),  # 3 tiles in 4 splits (one empty), two stages, rows padded
    ([64, GEMM_W, 32, 32, 2, 16, 4], 128, 320),  # scales and zero points from one int32 [G, N] (bit 5)
    ([64, GEMM_W, 64, 33, 1, 32, 4], 256, 512),  # the same, scale per weight
    ([8, GEMV_W, 32, 0, 1, 16, 4], 128, 384),  # the word GEMV: 5 rows padded to 8
    ([8, GEMV_W, 16, 0, 3, 16, 4], 256, 320),  # 2.5 tiles in 3 splits, the last tile masked
    ([8, GEMV_W, 32, 16, 2, 16, 4], 128, 320),  # the next tile loaded one iteration ahead (bit 4)
    ([8, GEMV_W, 16, 16, 4, 16, 4], 128, 384),  # the same, 3 tiles in 4 splits (one empty)
]


@pytest.mark.parametrize("entry,group,in_f", WORDS)
@pytest.mark.parametrize("sym", [True, False])
def test_word_kernel(entry, group, in_f, sym):
    """GEMM_W / GEMV_W on the word layout equal the fake-quant reference (GEMM_W on CUDA with bf16: the
    inline-PTX nibble conversion; the interpreter and fp32: the fp32 path), rows and output rows padding
    the tile."""
    qt = random_qtensor(40, in_f, 4, group, sym, seed=in_f + group + 1)
    x = torch.randn(5, in_f)
    ref = QLinear(qt)(x)
    w, s = pack_words(qt.codes).to(DEV), qt.scales.to(DEV)
    z = None if sym else qt.zeros.to(DEV)
    sz = pack_scale_zero(qt.scales, qt.zeros).to(DEV)  # read only by entries with option bit 5
    for dtype in _dtypes():
        assert _close(launch(x.to(DEV, dtype), w, s, z, in_f, group, entry, sz), ref, dtype)


@pytest.mark.parametrize("group,in_f", [(128, 384), (128, 320), (32, 176), (64, 256), (256, 512)])
@pytest.mark.parametrize("sym", [True, False])
def test_dequant_words_equals_dequantize(group, in_f, sym):
    """DEQUANT's first step: the word layout → the dense weight equals qform.dequantize bit for bit in fp32
    (the same (code - zero) * scale) and its rounding in bf16; any group size (looked up per column), a
    ragged last tile, output rows that pad the block. Then the whole DEQUANT entry (dense matmul) equals the
    fake-quant reference."""
    qt = random_qtensor(40, in_f, 4, group, sym, seed=in_f + group + 2)
    w, s = pack_words(qt.codes).to(DEV), qt.scales.to(DEV)
    z = None if sym else qt.zeros.to(DEV)
    ref_w = dequantize(qt)
    x = torch.randn(70, in_f)
    ref = QLinear(qt)(x)
    for dtype in _dtypes():
        got = dequant_words(w, s, z, in_f, group, 32, 4, dtype).cpu()
        assert torch.equal(got, ref_w.to(dtype))
        assert _close(
            launch(x.to(DEV, dtype), w, s, z, in_f, group, [1 << 30, DEQUANT, 32, 0, 1, 0, 4]), ref, dtype
        )


def test_linear_plan_with_dequant_keeps_the_words():
    """A plan whose large-row entry is DEQUANT keeps the word layout even where its small-row GEMM_W entry
    runs as GEMM_T (groups narrower than 128 columns), and each entry equals the fake-quant reference."""
    qt = random_qtensor(40, 256, 4, 64, False, seed=5)
    plan = [8, GEMM_W, 32, 0, 1, 16, 4, 1 << 30, DEQUANT, 32, 0, 1, 0, 4]
    for dtype in _dtypes():
        mod = Int4TritonLinear(qt, dtype=dtype, device=DEV, plan=plan)
        assert mod.plan[1] == GEMM_T and mod.plan[ENTRY + 1] == DEQUANT
        assert mod.weight_words is not None and mod.weight_tiled is not None and mod.weight is None
        for rows in (3, 20):
            x = torch.randn(rows, 256)
            assert _close(mod(x.to(DEV, dtype)), QLinear(qt)(x), dtype)


@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("sym", [True, False])
def test_packed_scale_zero(scale_dtype, sym):
    """`pack_scale_zero`: int32 [G, N], the scale's 16 bits over the zero point (8 when symmetric); GEMM_W
    reading it equals the fake-quant reference. fp32 scales are not packed (their bits would not fit):
    the layer keeps none and the entry's bit 5 reads s and z instead."""
    qt = random_qtensor(40, 256, 4, 128, sym, seed=11, scale_dtype=scale_dtype)
    sz = pack_scale_zero(qt.scales, qt.zeros)
    if scale_dtype == torch.float32:
        assert sz is None
    else:
        assert sz.shape == (2, 40) and sz.dtype == torch.int32
        zeros = torch.full((40, 2), 8) if sym else qt.zeros.long()
        assert torch.equal((sz & 0xFF).T.long(), zeros)
        assert torch.equal((sz >> 16).to(torch.int16).view(scale_dtype).T, qt.scales)
    plan = [64, GEMM_W, 32, 32, 1, 16, 4]
    x = torch.randn(5, 256)
    ref = QLinear(qt)(x)
    for dtype in _dtypes():
        mod = Int4TritonLinear(qt, dtype=dtype, device=DEV, plan=plan)
        assert (mod.scale_zero_words is None) == (sz is None)
        assert _close(mod(x.to(DEV, dtype)), ref, dtype)


def test_pack_words_layout():
    """Nibble j of word q of a row's tile holds column 128 t + 16 j + q; the tiles of 32 consecutive rows
    are stored together (16 words a row), tile after tile; a ragged last tile or block is padded with 0."""
    codes = torch.randint(0, 16, (40, 200), dtype=torch.uint8)
    words = pack_words(codes)
    assert words.dtype == torch.int32 and words.shape == (64, 32)  # 2 tiles of 16 words, rows to 64
    flat = words.view(-1)

    def tile(block, t):  # [32 rows, 16 words]
        start = (block * 2 + t) * 32 * 16
        return flat[start : start + 32 * 16].view(32, 16)

    for j in range(8):
        got = (tile(1, 0)[:8] >> (4 * j)) & 0xF
        assert torch.equal(got, codes[32:, 16 * j : 16 * j + 16].to(torch.int32))
    tail = (tile(0, 1) >> 12) & 0xF  # nibble 3 of tile 1: columns 176..191, inside the 200 columns
    assert torch.equal(tail, codes[:32, 176:192].to(torch.int32))
    assert not ((tile(0, 1) >> 20) & 0xF).any()  # nibble 5: columns 208..223, padding
    assert not tile(1, 1)[8:].any()  # rows 40..63: padding


def test_word_plan_keeps_only_the_word_packing_or_falls_back():
    """A GEMV_W + GEMM_W plan keeps only the word packing; a layer with groups narrower than 128 columns
    runs GEMM_W's tile through GEMM_T and the default GEMV instead of GEMV_W (act-order, asymmetric), each
    equal to the fake-quant reference."""
    plan = [1, GEMV_W, 32, 0, 2, 16, 4, 64, GEMM_W, 32, 1, 2, 16, 4]
    for group in (128, 64):
        qt = random_qtensor(48, 256, 4, group, False, act_order=True, seed=group)
        for dtype in _dtypes():
            mod = Int4TritonLinear(qt, dtype=dtype, device=DEV, plan=plan)
            assert mod.tinygemm_weight is None
            if group == 128:
                assert mod.weight is None
                assert mod.weight_tiled is None and mod.weight_words.shape == (64, 32)
            else:
                assert mod.weight_words is None and mod.plan[7:] == [64, GEMM_T, 32, 65, 2, 16, 4]
                assert mod.plan[1] == GEMV  # the default GEMV on qform's packing
            for rows in (1, 9):
                x = torch.randn(rows, 256)
                assert _close(mod(x.to(DEV, dtype)), QLinear(qt)(x), dtype)


def _cell(gemv_us, gemm_us, tiny_us):
    return {
        "tinygemm_us": tiny_us,
        "gemv": {"us": gemv_us, "entry": [0, GEMV, 32, 256, 2, 16, 4]},
        "gemm": {"us": gemm_us, "entry": [0, GEMM, 64, 64, 1, 16, 4]},
    }


def test_plan_follows_the_measured_table():
    """Per row bucket the fastest measured kernel; tinygemm only where the layer fits it."""
    table = {
        "shapes": [
            {"n": 64, "k": 256, "rows": {"1": _cell(10, 30, 20), "32": _cell(90, 40, 80)}},
            {"n": 32, "k": 256, "rows": {"1": _cell(30, 40, 20), "32": _cell(90, 60, 50)}},
            {"n": 16, "k": 256, "rows": {"1": _cell(30, 40, 20), "32": _cell(90, 40, 50)}},
        ]
    }
    gemv, gemm, tiny = [GEMV, 32, 256, 2, 16, 4], [GEMM, 64, 64, 1, 16, 4], [TINYGEMM, 0, 0, 1, 0, 0]
    assert int4_table.plan_from_table(table, 64, 256) == ("int4_triton", [1, *gemv, 32, *gemm])
    assert int4_table.plan_from_table(table, 32, 256) == ("int4_tinygemm", [])  # tinygemm faster in both
    assert int4_table.plan_from_table(table, 16, 256) == ("int4_triton", [1, *tiny, 32, *gemm])
    assert int4_table.plan_from_table(table, 16, 256, allow_tinygemm=False) == (
        "int4_triton",
        [1, *gemv, 32, *gemm],
    )
    assert int4_table.plan_from_table(table, 128, 256) is None  # not measured: the earlier rule


@pytest.mark.parametrize("out_f", [48, 44])  # 44: not a multiple of 8, a shape tinygemm cannot take
def test_plan_mixing_tinygemm_and_triton(out_f):
    """A layer whose plan gives tinygemm to 1 row and the Triton GEMM beyond keeps both packings; each
    bucket's result equals the fake-quant reference (tinygemm: torch's CPU kernel on the CPU). Where
    tinygemm cannot run the layer (its shape; on CUDA any dtype but bf16, which failed on the H200 in
    session 5 with fp32), that bucket runs our GEMV instead."""
    qt = random_qtensor(out_f, 256, 4, 64, False, act_order=True, seed=3)
    plan = [1, TINYGEMM, 0, 0, 1, 0, 0, 64, GEMM, 32, 64, 2, 16, 4]
    for dtype in _dtypes():
        mod = Int4TritonLinear(qt, dtype=dtype, device=DEV, plan=plan)
        tinygemm = out_f % 8 == 0 and (DEV == "cpu" or dtype == torch.bfloat16)
        assert (mod.tinygemm_weight is not None) == tinygemm
        assert mod.plan[:2] == [1, TINYGEMM if tinygemm else GEMV] and mod.plan[7:] == plan[7:]
        for rows in (1, 9):
            x = torch.randn(rows, 256)
            assert _close(mod(x.to(DEV, dtype)), QLinear(qt)(x), dtype)


def test_tiled_plan_keeps_only_the_tiled_packing():
    """A plan of tiled kernels only (GEMV_T at 1 row, GEMM_T beyond) keeps the tiled codes and neither
    qform's packing nor tinygemm's; act-order columns and asymmetric zeros through both kernels."""
    qt = random_qtensor(48, 256, 4, 64, False, act_order=True, seed=5)
    plan = [1, GEMV_T, 32, 16, 2, 16, 4, 64, GEMM_T, 32, 1, 2, 16, 4]
    for dtype in _dtypes():
        mod = Int4TritonLinear(qt, dtype=dtype, device=DEV, plan=plan)
        assert mod.weight is None and mod.tinygemm_weight is None and mod.weight_tiled.shape == (64, 128)
        for rows in (1, 9):
            x = torch.randn(rows, 256)
            assert _close(mod(x.to(DEV, dtype)), QLinear(qt)(x), dtype)


def test_plan_prefers_the_faster_tiled_cell():
    """The table's tiled cells (gemv_t, gemm_t) compete with the others per row bucket."""
    cell = _cell(30, 40, 20)
    cell["gemv_t"] = {"us": 12, "entry": [0, GEMV_T, 64, 16, 4, 16, 4]}
    cell32 = _cell(90, 40, 50)
    cell32["gemm_t"] = {"us": 25, "entry": [0, GEMM_T, 128, 1, 1, 32, 4]}
    table = {"shapes": [{"n": 64, "k": 256, "rows": {"1": cell, "32": cell32}}]}
    assert int4_table.plan_from_table(table, 64, 256) == (
        "int4_triton",
        [1, GEMV_T, 64, 16, 4, 16, 4, 32, GEMM_T, 128, 1, 1, 32, 4],
    )


def test_shipped_tables_give_runnable_plans():
    """Every shipped table's plans name kernels and tiles the launcher takes (power-of-two tiles)."""
    files = sorted(int4_table.TABLE_DIR.glob("int4_*.json"))
    for f in files:
        table = json.loads(f.read_text())
        for row in table["shapes"]:
            choice = int4_table.plan_from_table(table, row["n"], row["k"])
            assert choice is not None and choice[0] in ("int4_triton", "int4_tinygemm")
            entries = [choice[1][i : i + ENTRY] for i in range(0, len(choice[1]), ENTRY)]
            for rows, kind, bn, bk, splits, bm, warps in entries:
                assert (
                    kind in (GEMV, GEMM, TINYGEMM, GEMV_T, GEMM_T, GEMM_W, GEMV_W, MMA)
                    and splits >= 1
                    and rows >= 1
                )
                if kind in (GEMV, GEMM):
                    assert bk >= 32 and not bk & (bk - 1)
                if kind == MMA:  # the CUDA kernel (runtime/cuda_int4.py): its block layout, 1-8 rows only
                    assert rows <= cuda_int4.MAX_ROWS and bn in cuda_int4.KSB_CHOICES
                    assert max(1, bk) in cuda_int4.RPW_CHOICES and bm in cuda_int4.MINB_CHOICES
                    assert 32 * bn * bm <= 2048 and not warps & ~(cuda_int4.SUBA | cuda_int4.SUBX)
                    assert rows == 1 or not warps & cuda_int4.SUBX  # SUBX takes one activation row
                elif kind != TINYGEMM:
                    assert not bn & (bn - 1) and bm >= 16 and warps in (2, 4, 8)


@pytest.mark.parametrize("sym,act_order", [(True, False), (False, True)])
def test_the_untabled_rule_equals_fake_quant_at_every_bucket(sym, act_order):
    """A layer no table holds runs GEMM_W by int4_table.untabled_plan (on CUDA 8.0+): at rows in each of its
    buckets (split-K 4 up to 64 rows here, 4 row blocks by 4 splits up to 256, unsplit beyond) its product equals
    the fake-quant reference, act-order columns permuted, the scales and zero points read as one int32."""
    qt = random_qtensor(192, 1024, 4, 128, sym, act_order=act_order, seed=3, bias=True)
    plan = int4_table.untabled_plan(192, 1024, 132)
    for dtype in _dtypes():
        mod = Int4TritonLinear(qt, dtype=dtype, device=DEV, plan=plan)
        assert mod.plan == plan and mod.scale_zero_words is not None and mod.tinygemm_weight is None
        for rows in (1, 17, 40, 70, 300):
            x = torch.randn(rows, 1024)
            assert _close(mod(x.to(DEV, dtype)), QLinear(qt)(x), dtype), (dtype, rows)


def test_a_plan_ending_on_the_mma_kernel_runs_the_untabled_rule_beyond_it(monkeypatch):
    """A table measured only up to 8 rows: beyond its MMA entries the layer runs the GEMM_W rule (it keeps the
    word packing, not tinygemm's) and equals the fake-quant reference at 12 and 100 rows (the MMA entries kept
    as on a GPU; these row counts never reach them)."""
    from lorafast_export.runtime import linear

    monkeypatch.setattr(linear, "_mma_to_gemv", lambda plan, *a: plan)
    monkeypatch.setattr(linear, "_untabled_plan", lambda qt, dev: int4_table.untabled_plan(64, 256, 132))
    qt = random_qtensor(64, 256, 4, 128, False, seed=5)
    mma = [1, MMA, 8, 1, 1, 0, 0, 8, MMA, 8, 1, 1, 0, 0]
    layer = Int4TritonLinear(qt, dtype=torch.float32, device=DEV, plan=mma)
    assert layer.plan == mma + int4_table.untabled_plan(64, 256, 132)
    assert layer.weight_words is not None and layer.tinygemm_weight is None
    for rows in (12, 100):
        x = torch.randn(rows, 256)
        assert _close(layer(x.to(DEV)), QLinear(qt)(x), torch.float32)


@pytest.mark.skipif(DEV == "cuda", reason="helpers.paged builds on the CPU; on CUDA: torch_bench.py check")
def test_runtime_with_triton_kernels_equals_fake_quant_model(tmp_path):
    """The paged runtime built with kernel=triton (fused qkv / gate-up): prefill (6 rows, GEMM) and decode
    (2 rows, GEMV) give the logits of the fake-quant decoder."""
    md = tiny_checkpoint(tmp_path, hidden=64, intermediate_size=96)
    fp, q = quantize_all(md, 4, 32, False)
    pm, cache = paged(md, fp, q, kernel="triton")
    assert {type(m).__name__ for m in pm.dec.modules() if hasattr(m, "kernel")} == {"Int4TritonLinear"}
    ids = torch.randint(0, 96, (9,))
    with torch.no_grad():
        want = fake_quant_decoder(md, q)(ids[None])[0][0]
    assert (paged_logits(pm, cache, ids, 6) - want).abs().max() < 1e-4 * want.abs().max()


@pytest.mark.skipif(DEV == "cuda", reason="helpers.paged builds on the CPU; on CUDA: torch_bench.py check")
def test_runtime_with_word_kernels_equals_fake_quant_model(tmp_path, monkeypatch):
    """The paged runtime whose layers run GEMV_W up to 2 rows (decode, padded to 2) and GEMM_W beyond
    (g128, fused qkv / gate-up): prefill and decode give the logits of the fake-quant decoder."""
    from lorafast_export.runtime import linear

    monkeypatch.setattr(
        linear, "default_plan", lambda: [2, GEMV_W, 32, 0, 2, 16, 4, 1 << 30, GEMM_W, 32, 0, 1, 16, 4]
    )
    md = tiny_checkpoint(tmp_path, hidden=128, intermediate_size=256)
    fp, q = quantize_all(md, 4, 128, False)
    pm, cache = paged(md, fp, q, kernel="triton")
    layers = [m for m in pm.dec.modules() if hasattr(m, "kernel")]
    assert layers and all(m.weight_words is not None and m.weight_tiled is None for m in layers)
    ids = torch.randint(0, 96, (9,))
    with torch.no_grad():
        want = fake_quant_decoder(md, q)(ids[None])[0][0]
    assert (paged_logits(pm, cache, ids, 6) - want).abs().max() < 1e-4 * want.abs().max()


def test_pack_words_equals_the_sum_of_shifted_codes():
    """The in-place OR packing (one int32 temporary, session 8) gives the words of the earlier sum of eight
    shifted int32 planes bit for bit, nibble 7 (bit 31) included: every code 15 and random codes."""
    for codes in (
        torch.full((33, 256), 15, dtype=torch.uint8),
        torch.randint(0, 16, (40, 200), dtype=torch.uint8),
    ):
        c = torch.nn.functional.pad(
            codes.to(torch.int32), (0, -codes.shape[1] % 128, 0, -codes.shape[0] % 32)
        )
        c = c.view(c.shape[0] // 32, 32, c.shape[1] // 128, 8, 16)
        ref = sum(c[:, :, :, j] << (4 * j) for j in range(8)).permute(0, 2, 1, 3).reshape(-1, c.shape[2] * 16)
        assert torch.equal(pack_words(codes), ref)
