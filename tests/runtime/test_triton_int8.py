"""Our Triton int8 weight-only GEMV/GEMM equal the fake-quant reference (qform.QLinear: dequantize, then
matmul), per channel and grouped, symmetric and asymmetric, with act-order.

Runs on CUDA, or on the CPU through Triton's interpreter (tests/runtime/triton_device.py)."""
# ruff: noqa: I001 - tests.runtime.triton_device must be imported before any kernel module

import json

import pytest
import torch

from tests.runtime.triton_device import DEV  # first: sets the interpreter flag before triton loads
from lorafast_export.qform import QLinear, dequantize
from lorafast_export.runtime.linear import choose_kernel
from lorafast_export.runtime import int4_table
from lorafast_export.runtime.triton_int4 import DEQUANT, GEMM, GEMM_T, GEMV
from lorafast_export.runtime.triton_int8 import dequant8, launch8
from tests.quant.helpers import random_qtensor
from tests.runtime.test_triton_int4 import _close, _dtypes, assert_lowered_matches

SCHEMES = [  # out, in, group, symmetric, act_order
    (48, 256, -1, True, False),  # per channel
    (40, 200, -1, False, False),  # per channel, K not a multiple of the tile: the last tile masked
    (56, 256, 64, False, True),
    (24, 176, 32, True, False),  # 5.5 groups: the last one ragged
]


@pytest.mark.parametrize("out_f,in_f,group,sym,act_order", SCHEMES)
@pytest.mark.parametrize("rows", [1, 3, 20])  # the default plan: GEMV up to 4 rows, GEMM beyond
def test_int8_triton_linear_matches_fake_quant(out_f, in_f, group, sym, act_order, rows):
    qt = random_qtensor(out_f, in_f, 8, group, sym, act_order=act_order, seed=rows, bias=True)
    assert_lowered_matches(qt, rows, "int8_triton")


ENTRIES = [  # (max rows, kind, BN, BK, splits, BM, warps): split-K, tiles wider than N or K's last part
    [8, GEMV, 16, 64, 3, 16, 4],
    [8, GEMV, 64, 256, 2, 16, 8],
    [64, GEMM, 16, 32, 4, 16, 4],
    [64, GEMM, 32, 128, 2, 32, 4],
    [64, GEMM_T, 16, 32, 3, 16, 4],  # swapped operands
    [64, GEMM_T, 32, 64, 1, 16, 4],
    [64, DEQUANT, 16, 64, 1, 16, 4],  # the dense weight per call, then torch's matmul
    [64, DEQUANT, 32, 256, 1, 16, 4],  # tiles past N and K
]


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("group", [-1, 32])
def test_int8_kernel_tiles_and_splits(entry, group):
    qt = random_qtensor(40, 384, 8, group, group == -1, seed=7)
    x = torch.randn(5, 384)
    ref = QLinear(qt)(x)
    w, s = qt.codes.to(DEV), qt.scales.to(DEV)
    z = None if qt.zeros is None else qt.zeros.to(DEV)
    for dtype in _dtypes():
        assert _close(launch8(x.to(DEV, dtype), w, s, z, group, entry), ref, dtype)


@pytest.mark.parametrize("group,sym", [(-1, True), (-1, False), (32, False), (64, True)])
def test_int8_dequant_kind_is_qform_dequantize(group, sym):
    """DEQUANT's dense weight is qform.dequantize's, rounded once to the activation dtype, bit for bit
    (float32 and float16; bf16 on CUDA, where Triton's interpreter truncates instead of rounding)."""
    qt = random_qtensor(40, 200, 8, group, sym, seed=3)
    w, s = qt.codes.to(DEV), qt.scales.to(DEV)
    z = None if qt.zeros is None else qt.zeros.to(DEV)
    gs = 256 if group == -1 else group
    for dtype in [torch.float32, torch.float16] + ([torch.bfloat16] if DEV == "cuda" else []):
        got = dequant8(w, s, z, gs, 16, 64, 4, dtype).cpu()
        assert torch.equal(got, dequantize(qt).to(dtype)), dtype


def test_int8_triton_only_when_asked_for():
    """A shape no int8 table measured: auto keeps int8 on its earlier kernels; odd groups stay dequant."""
    qt = random_qtensor(32, 128, 8, -1, True)
    assert choose_kernel(qt, DEV, torch.bfloat16, "auto") != "int8_triton"
    assert choose_kernel(qt, DEV, torch.bfloat16, "triton") == "int8_triton"
    assert choose_kernel(random_qtensor(32, 120, 8, 24, True), DEV, torch.bfloat16, "triton") == "dequant"


def test_int8_plan_where_the_table_beats_bf16_at_decode_rows():
    """int8_plan_from_table: per bucket the measured entry, the last bucket covering larger counts; no plan
    (the layer stays bf16-dequantized) when the shape is unmeasured or bf16 won a decode bucket (<= 32 rows).
    A prefill bucket bf16 won still runs int8; a table without one gets DEQUANT past its last bucket."""
    gemv, gemm_t = [1, GEMV, 64, 256, 4, 16, 4], [32, GEMM_T, 128, 64, 1, 32, 4]
    deq = [1024, DEQUANT, 64, 128, 1, 16, 4]
    win = {"1": {"bf16_us": 10, "us": 6, "entry": gemv}, "32": {"bf16_us": 12, "us": 11, "entry": gemm_t}}
    lose = {**win, "32": {"bf16_us": 12, "us": 13, "entry": gemm_t}}
    prefill = {**win, "1024": {"bf16_us": 50, "us": 70, "entry": deq}}
    table = {
        "shapes": [
            {"n": 64, "k": 128, "rows": win},
            {"n": 32, "k": 128, "rows": lose},
            {"n": 96, "k": 128, "rows": prefill},
            {"n": 128, "k": 128, "rows": {"1024": prefill["1024"]}},
        ]
    }
    old_rows_plan = [1, *gemv[1:], 32, *gemm_t[1:], *int4_table.PREFILL_DEQUANT]
    assert int4_table.int8_plan_from_table(table, 64, 128) == old_rows_plan
    assert int4_table.int8_plan_from_table(table, 96, 128) == [
        1,
        *gemv[1:],
        32,
        *gemm_t[1:],
        1 << 30,
        *deq[1:],
    ]
    assert int4_table.int8_plan_from_table(table, 32, 128) is None
    assert int4_table.int8_plan_from_table(table, 128, 128) is None  # no decode bucket measured
    assert int4_table.DEQUANT_KIND == DEQUANT and int4_table.PREFILL_DEQUANT[1] == DEQUANT
    assert int4_table.int8_plan_from_table(table, 16, 128) is None


def test_shipped_int8_tables_give_runnable_plans():
    """Every shipped int8 table's plans name kernels launch8 takes, for shapes where our kernel won."""
    for f in sorted(int4_table.TABLE_DIR.glob("int8_*.json")):
        table = json.loads(f.read_text())
        for row in table["shapes"]:
            plan = int4_table.int8_plan_from_table(table, row["n"], row["k"])
            wins = all(c["us"] < c["bf16_us"] for b, c in row["rows"].items() if int(b) <= 32)
            assert (plan is not None) == wins
            for i in range(0, len(plan or []), 7):
                assert plan[i + 1] in (GEMV, GEMM, GEMM_T, DEQUANT) and plan[i + 4] >= 1
            assert plan is None or plan[-7] == 1 << 30
