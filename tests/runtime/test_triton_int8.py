"""Our Triton int8 weight-only GEMV/GEMM equal the fake-quant reference (qform.QLinear: dequantize, then
matmul), per channel and grouped, symmetric and asymmetric, with act-order.

Runs on CUDA, or on the CPU through Triton's interpreter (tests/runtime/triton_device.py)."""
# ruff: noqa: I001 - tests.runtime.triton_device must be imported before any kernel module

import json

import pytest
import torch

from tests.runtime.triton_device import DEV  # first: sets the interpreter flag before triton loads
from lorafast_export.qform import QLinear
from lorafast_export.runtime.linear import choose_kernel
from lorafast_export.runtime import int4_table
from lorafast_export.runtime.triton_int4 import GEMM, GEMM_T, GEMV
from lorafast_export.runtime.triton_int8 import launch8
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


def test_int8_triton_only_when_asked_for():
    """A shape no int8 table measured: auto keeps int8 on its earlier kernels; odd groups stay dequant."""
    qt = random_qtensor(32, 128, 8, -1, True)
    assert choose_kernel(qt, DEV, torch.bfloat16, "auto") != "int8_triton"
    assert choose_kernel(qt, DEV, torch.bfloat16, "triton") == "int8_triton"
    assert choose_kernel(random_qtensor(32, 120, 8, 24, True), DEV, torch.bfloat16, "triton") == "dequant"


def test_int8_plan_only_where_the_table_beats_bf16_everywhere():
    """int8_plan_from_table: per bucket the measured tile, the last bucket covering larger counts; no plan
    (the layer stays bf16-dequantized) when the shape is unmeasured or bf16 won any bucket."""
    gemv, gemm_t = [1, GEMV, 64, 256, 4, 16, 4], [32, GEMM_T, 128, 64, 1, 32, 4]
    win = {"1": {"bf16_us": 10, "us": 6, "entry": gemv}, "32": {"bf16_us": 12, "us": 11, "entry": gemm_t}}
    lose = {**win, "32": {"bf16_us": 12, "us": 13, "entry": gemm_t}}
    table = {"shapes": [{"n": 64, "k": 128, "rows": win}, {"n": 32, "k": 128, "rows": lose}]}
    assert int4_table.int8_plan_from_table(table, 64, 128) == [1, *gemv[1:], 1 << 30, *gemm_t[1:]]
    assert int4_table.int8_plan_from_table(table, 32, 128) is None
    assert int4_table.int8_plan_from_table(table, 16, 128) is None


def test_shipped_int8_tables_give_runnable_plans():
    """Every shipped int8 table's plans name kernels launch8 takes, for shapes where our kernel won."""
    for f in sorted(int4_table.TABLE_DIR.glob("int8_*.json")):
        table = json.loads(f.read_text())
        for row in table["shapes"]:
            plan = int4_table.int8_plan_from_table(table, row["n"], row["k"])
            wins = all(c["us"] < c["bf16_us"] for c in row["rows"].values())
            assert (plan is not None) == wins
            for i in range(0, len(plan or []), 7):
                assert plan[i + 1] in (GEMV, GEMM, GEMM_T) and plan[i + 4] >= 1
