"""`lorafast-export tune-kernels`: the int4 kernel table measured for a model's shapes on this machine's GPU,
written to LORAFAST_CACHE/kernels/ and read by the runtime before the shipped tables. On the CPU the same code
runs through Triton's interpreter (--dry-run): its times mean nothing, but the table it writes is a real one,
which the runtime's planner reads (runtime/int4_table.py)."""

import json

import pytest
import torch
from click.testing import CliRunner

from lorafast_export.cli import main
from lorafast_export.errors import InputError
from lorafast_export.runtime import int4_table
from lorafast_export.runtime.int4_table import load_table, plan_from_table, user_table_file

CONFIG = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 96,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
}
SHAPES = [(256, 128), (128, 128), (512, 128), (128, 256)]  # qkv, o, gate_up, down of CONFIG


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAFAST_CACHE", str(tmp_path / "cache"))
    load_table.cache_clear()
    yield tmp_path / "cache"
    load_table.cache_clear()  # no table of this test's cache is served to a later one


def _model(tmp_path, **changes):
    d = tmp_path / f"m{len(changes)}"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({**CONFIG, **changes}))
    return d


def _tune(*args):
    return CliRunner().invoke(main, ["--json", "tune-kernels", *map(str, args)])


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: it measures that GPU, not a dry run")
def test_dry_run_writes_a_table_the_planner_reads_and_a_second_model_adds_to_it(tmp_path, cache):
    r = _tune("--model", _model(tmp_path), "--rows", "1", "--quick", "--dry-run")
    assert r.exit_code == 0, r.output
    res = json.loads(r.output)
    assert res["shapes"] == [f"{n}x{k}" for n, k in SHAPES] and res["skipped_by_budget"] == []
    path = user_table_file("cpu-interpreter")
    assert res["table"] == str(path) and path.is_file()
    table = load_table("cpu-interpreter")
    assert table == json.loads(path.read_text()) and table["gpu"] == "cpu-interpreter" and table["date"]
    assert table["measured"] == f"rows [1] measured in a {table['date']} run"  # its provenance, no empty part
    for n, k in SHAPES:
        kind, plan = plan_from_table(table, n, k)  # every shape measured: a kernel per row bucket
        assert kind in ("int4_triton", "int4_tinygemm") and (kind == "int4_tinygemm" or plan[0] == 1)
    # a model of other widths: its shapes join the table, the first model's stay
    r = _tune(
        "--model",
        _model(tmp_path, hidden_size=64, intermediate_size=128),
        "--rows",
        "1",
        "--quick",
        "--dry-run",
    )
    assert r.exit_code == 0, r.output
    table = load_table("cpu-interpreter")
    got = {(s["n"], s["k"]) for s in table["shapes"]}
    assert (
        table["measured"].count("; rows [1] replaced by a ") == 1
    )  # the first run's line kept, the second's added
    assert set(SHAPES) <= got and (64, 128) in got  # the second model's down_proj [hidden, intermediate]


def test_budget_cuts_the_last_buckets_and_says_so(tmp_path, cache):
    r = _tune("--model", _model(tmp_path), "--rows", "1,8", "--quick", "--dry-run", "--budget-s", "0")
    assert r.exit_code == 0, r.output
    res = json.loads(r.output)
    assert res["measured_cells"] == 0 and len(res["skipped_by_budget"]) == 2 * len(SHAPES)
    assert not user_table_file("cpu-interpreter").exists()  # nothing measured, nothing written


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: it would measure")
def test_without_a_gpu_it_refuses_and_writes_nothing(tmp_path, cache):
    r = _tune("--model", _model(tmp_path), "--rows", "1")
    assert r.exit_code == 2 and "CUDA GPU" in r.output and "--dry-run" in r.output
    assert not (cache / "kernels").exists()


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--rows", "1,x"], "--rows"),
        (["--rows", "0"], "--rows"),
    ],
)
def test_bad_rows_are_refused(tmp_path, cache, args, needle):
    r = _tune("--model", _model(tmp_path), *args, "--dry-run")
    assert r.exit_code == 2 and needle in r.output


def test_a_directory_without_config_is_refused_by_name(tmp_path, cache):
    r = _tune("--model", tmp_path, "--dry-run")
    assert r.exit_code == 2 and str(tmp_path) in r.output and "config.json" in r.output


def test_the_users_table_is_read_before_the_shipped_one_and_a_damaged_one_is_named(cache):
    gpu = "NVIDIA H200"  # a GPU we ship a table for
    shipped = json.loads(int4_table.table_file(gpu).read_text())
    path = user_table_file(gpu)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"gpu": gpu, "shapes": []}))
    assert load_table(gpu) == {"gpu": gpu, "shapes": []} != shipped
    load_table.cache_clear()
    path.write_text("{not json")
    with pytest.raises(InputError, match="tune-kernels") as e:
        load_table(gpu)
    assert str(path) in str(e.value)
    load_table.cache_clear()
    path.unlink()
    assert load_table(gpu) == shipped


def _a_gpu(monkeypatch, major: int, sms: int = 132, name: str = "NVIDIA Unmeasured 9000"):
    """This process sees one CUDA GPU that we ship no table for (nothing runs on it)."""
    from types import SimpleNamespace

    props = SimpleNamespace(major=major, minor=0, multi_processor_count=sms)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)


def test_an_unmeasured_gpu_says_once_how_to_measure_it(monkeypatch, caplog, cache):
    """A GPU without a table entry for a layer runs the GEMM_W rule (compute capability 8.0+, groups of 128
    columns) or else tinygemm, and says once a process which, and how to measure a table."""
    from lorafast_export.quant.rtn import quantize_rtn
    from lorafast_export.runtime import linear
    from lorafast_export.runtime.int4_table import untabled_plan

    qt = quantize_rtn(torch.randn(256, 128), 4, 128, False, scale_dtype=torch.float16)
    g64 = quantize_rtn(torch.randn(256, 128), 4, 64, False, scale_dtype=torch.float16)
    for major, layer, plan, says in (
        (9, qt, untabled_plan(256, 128, 132), "GEMM_W"),
        (9, g64, None, "tinygemm"),  # the word layout's tiles hold 128 columns
        (7, qt, None, "tinygemm"),  # no bf16 tensor cores
    ):
        _a_gpu(monkeypatch, major)
        monkeypatch.setattr(linear, "_UNMEASURED", set())
        caplog.clear()
        with caplog.at_level("WARNING", logger="lorafast_export.runtime.linear"):
            for _ in range(2):
                assert linear._table_plan(layer, "cuda", torch.bfloat16) == plan
        said = [r.getMessage() for r in caplog.records if "tune-kernels" in r.getMessage()]
        assert len(said) == 1 and "Unmeasured 9000" in said[0] and "[256, 128]" in said[0] and says in said[0]


def test_the_untabled_rule_picks_the_tiles_the_h100_measured_fastest():
    """untabled_plan's GEMM_W tile for each 8B shape and row bucket 1-64, against the H100 table's sweep of
    every GEMM_W tile (tune-kernels, session 32): the measured fastest in 18 of 20 cells and within 3% of it in
    all (qkv at 32 rows 0.5% off, down at 64 rows 2.4% off), and faster than tinygemm in every cell from 8 rows on."""
    from lorafast_export.runtime import triton_int4 as t4
    from lorafast_export.runtime.int4_table import untabled_plan

    table = json.loads(int4_table.table_file("NVIDIA H100 80GB HBM3").read_text())
    best = cells = 0
    for row in table["shapes"]:
        plan = untabled_plan(row["n"], row["k"], 132)  # the H100 SXM's SMs
        for rows, cell in row["rows"].items():
            if "all" not in cell.get("gemm_w", {}):
                continue  # rows 2 and 4 swept only the MMA kernel and the GEMV
            entry = t4.pick(plan, int(rows))[1:]
            swept = {tuple(e[1:]): us for e, us in cell["gemm_w"]["all"]}
            fastest = min(swept.values())
            assert swept[tuple(entry)] <= 1.03 * fastest, (row["n"], row["k"], rows, entry)
            best += swept[tuple(entry)] == fastest
            cells += 1
            if int(rows) >= 8:
                assert swept[tuple(entry)] < cell["tinygemm_us"], (row["n"], row["k"], rows)
    assert (best, cells) == (18, 20)


def test_the_untabled_rule_splits_k_to_fill_the_gpu():
    from lorafast_export.runtime import triton_int4 as t4
    from lorafast_export.runtime.int4_table import untabled_plan

    down = untabled_plan(4096, 14336, 132)
    assert [t4.pick(down, r)[4] for r in (1, 64, 200, 4096)] == [8, 8, 2, 1]  # beyond 256 rows: no split
    assert t4.pick(untabled_plan(4096, 14336, 16), 1)[4] == 1  # 32 tiles fill a small GPU unsplit
    assert t4.pick(untabled_plan(4096, 512, 132), 1)[4] == 2  # each split keeps two 128-column tiles
    assert all(e[1] == t4.GEMM_W for e in (down[i : i + t4.ENTRY] for i in range(0, len(down), t4.ENTRY)))


def test_doctor_says_where_the_int4_kernel_choices_come_from(cache):
    from lorafast_export.inspection import int4_table_status

    assert int4_table_status("NVIDIA H200").startswith("shipped (int4_h200.json)")
    assert "tune-kernels --model" in int4_table_status("NVIDIA Unmeasured 9000")
    path = user_table_file("NVIDIA Unmeasured 9000")
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"shapes": []}))
    assert int4_table_status("NVIDIA Unmeasured 9000") == f"measured here by tune-kernels ({path})"


def test_fused_ops_measured_land_where_the_runtime_looks_them_up(tmp_path, cache, monkeypatch):
    """On CUDA tune-kernels also times the fused decode ops (CUDA only, so here their timing is replaced by a
    stand-in that records its calls); each op's fastest layout lands where runtime/int4_table.fused_mma_layout
    reads it for that shape, an op that cannot run is logged and left unfused, and the table's other contents
    stay."""
    from lorafast_export.runtime import cuda_int4, kernel_tune
    from lorafast_export.runtime.int4_table import fused_mma_layout

    dims = (128, 256, 4, 2, 32)
    path = user_table_file("NVIDIA Unmeasured 9000")
    path.parent.mkdir(parents=True)
    path.write_text(
        json.dumps({"shapes": [{"n": 256, "k": 128, "rows": {"1": {"mma": {"entry": [1, 9, 8, 1]}}}}]})
    )
    calls, lines = [], []

    def stand_in(op, ws, m, entry, d):
        calls.append((op, ws[0].out_features, ws[0].in_features, m, entry, d))
        if op == cuda_int4.O_OP:
            raise RuntimeError("NVRTC: no such GPU")
        return {"op": op, "n": ws[0].out_features, "k": ws[0].in_features, "rows": m, "plain_us": 5.0,
                "fused": [[[8, 0, len(calls)], 4.0], [[4, 2, 0], 6.0]]}  # fmt: skip

    monkeypatch.setattr(kernel_tune, "measure_fused", stand_in)
    fused = kernel_tune._tune_fused(path, dims, lines.append, torch.device("cpu"))
    assert fused == [cuda_int4.QKV_OP, cuda_int4.GLU_OP] and "NVRTC" in lines[0]
    assert calls[0] == (
        cuda_int4.QKV_OP,
        256,
        128,
        1,
        [1, 9, 8, 1],
        (4, 2, 32),
    )  # beside the table's MMA entry
    load_table.cache_clear()
    gpu = "NVIDIA Unmeasured 9000"
    assert fused_mma_layout(gpu, cuda_int4.QKV_OP, 256, 128) == [8, 0, 1]
    assert fused_mma_layout(gpu, cuda_int4.GLU_OP, 512, 128) == [8, 0, 3]
    assert fused_mma_layout(gpu, cuda_int4.O_OP, 128, 128) is None
    assert load_table(gpu)["shapes"][0]["n"] == 256


def test_without_triton_it_says_what_to_install(tmp_path, cache, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "triton" else real(name, *a)
    )
    r = _tune("--model", _model(tmp_path), "--rows", "1", "--dry-run")
    assert r.exit_code == 2 and "pip install triton" in r.output
    assert not (cache / "kernels").exists()


def _artifact(tmp_path, quant, **options):
    """A torch-compile artifact's layout as far as tune-kernels reads it: model/config.json, model/runtime.json."""
    d = tmp_path / "artifact"
    (d / "model").mkdir(parents=True)
    (d / "model" / "config.json").write_text(json.dumps(CONFIG))
    (d / "model" / "runtime.json").write_text(json.dumps({"quant": quant, "options": options}))
    return d


def test_an_artifact_with_a_quantized_head_has_its_head_measured(tmp_path, cache):
    a = _artifact(tmp_path, {"method": "rtn", "bits": 4, "group_size": 128, "quantize_lm_head": True})
    r = _tune("--model", a, "--rows", "1", "--quick", "--dry-run", "--budget-s", "0")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["shapes"] == [f"{n}x{k}" for n, k in SHAPES] + [
        "96x128"
    ]  # lm_head [vocab, hidden]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: it measures that GPU, not a dry run")
def test_an_int8_artifact_gets_the_int8_table_the_runtime_reads(tmp_path, cache):
    """int8 weight-only layers: tune-kernels measures the int8 table (every decode and prefill bucket), written
    where the runtime looks first; its verdict per shape is int8_plan_from_table's on the written table."""
    a = _artifact(tmp_path, {"method": "int8", "bits": 8, "group_size": -1}, lm_head="keep")
    r = _tune("--model", a, "--quick", "--dry-run")
    assert r.exit_code == 0, r.output
    res = json.loads(r.output)["int8"]
    assert res["shapes"] == [f"{n}x{k}" for n, k in SHAPES] and res["skipped_by_budget"] == []
    assert res["table"] == str(user_table_file("cpu-interpreter", 8))
    table = load_table("cpu-interpreter", 8)
    assert table["gpu"] == "cpu-interpreter" and table["measured"]
    for n, k in SHAPES:
        row = int4_table.shape_row(table, n, k)
        assert sorted(map(int, row["rows"])) == [1, 32, 128, 1024]
        assert all(c["us"] > 0 and c["bf16_us"] > 0 and len(c["entry"]) == 7 for c in row["rows"].values())
        in_int8 = int4_table.int8_plan_from_table(table, n, k) is not None
        assert in_int8 == (f"{n}x{k}" in res["in_int8"])
        assert in_int8 == all(row["rows"][b]["us"] < row["rows"][b]["bf16_us"] for b in ("1", "32"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: it measures that GPU, not a dry run")
def test_an_int4_artifact_with_an_int8_head_gets_both_tables(tmp_path, cache):
    a = _artifact(tmp_path, {"method": "awq", "bits": 4, "group_size": 128}, lm_head="int8")
    r = _tune("--model", a, "--rows", "1", "--quick", "--dry-run")
    assert r.exit_code == 0, r.output
    res = json.loads(r.output)
    assert res["shapes"] == [f"{n}x{k}" for n, k in SHAPES]  # int4: the decoder's linears
    assert res["int8"]["shapes"] == ["96x128"]  # int8: the head only
    assert int4_table.shape_row(load_table("cpu-interpreter", 8), 96, 128) is not None
    assert int4_table.shape_row(load_table("cpu-interpreter", 4), 96, 128) is None


def test_a_smoothquant_artifact_without_an_int8_head_is_refused(tmp_path, cache):
    r = _tune("--model", _artifact(tmp_path, {"method": "smoothquant", "bits": 8}), "--dry-run")
    assert r.exit_code == 2 and "SmoothQuant" in r.output and "nothing to measure" in r.output
    assert not (cache / "kernels").exists()


def test_a_table_measured_up_to_8_rows_keeps_larger_row_counts_off_the_mma_kernel():
    """Rows beyond a plan's last bucket run its last entry; the MMA kernel takes at most 8 rows, so a plan from a
    table measured at 1 and 8 rows (tune-kernels --rows 1,8, its first GPU run) ends, for every larger count (a
    prefill chunk raised in the MMA kernel before), with what a GPU without a table runs: the GEMM_W rule, or
    where the layer cannot take it tinygemm, else the default GEMM tile."""
    from lorafast_export.runtime import triton_int4 as t4
    from lorafast_export.runtime.cuda_int4 import MAX_ROWS
    from lorafast_export.runtime.int4_table import TINYGEMM_ENTRY, default_plan, untabled_plan
    from lorafast_export.runtime.linear import _bounded_tail

    mma = [1, t4.MMA, 8, 1, 1, 0, 0, 8, t4.MMA, 8, 1, 1, 0, 0]
    rule = untabled_plan(4096, 4096, 132)
    for tinygemm, untabled, tail in (
        (True, rule, None),
        (True, None, [1 << 30, *TINYGEMM_ENTRY]),
        (False, None, default_plan()[-t4.ENTRY :]),
    ):
        plan = _bounded_tail(mma, t4, tinygemm, untabled)
        assert t4.pick(plan, 1)[1] == t4.pick(plan, MAX_ROWS)[1] == t4.MMA
        for rows in (MAX_ROWS + 1, 40, 4096):
            assert t4.pick(plan, rows) == (tail or t4.pick(rule, rows))
        assert (
            _bounded_tail(default_plan(), t4, tinygemm, untabled) == default_plan()
        )  # a plan that ends unbounded is kept
    assert tail[1] == t4.GEMM and t4.pick(rule, 9)[1] == t4.GEMM_W


def test_a_tinygemm_tail_runs_tinygemm_beyond_the_plan(monkeypatch):
    """The layer behind such a plan keeps tinygemm's packing and gives tinygemm's product beyond 8 rows (its MMA
    entries kept as on a GPU; 12 rows never reach them)."""
    from lorafast_export.quant.rtn import quantize_rtn
    from lorafast_export.runtime import linear
    from lorafast_export.runtime import triton_int4 as t4
    from lorafast_export.runtime.linear import Int4Linear, Int4TritonLinear

    monkeypatch.setattr(linear, "_mma_to_gemv", lambda plan, *a: plan)  # keep the MMA entries as a GPU would
    torch.manual_seed(0)
    qt = quantize_rtn(torch.randn(64, 256), 4, 128, False)
    plan = [1, t4.MMA, 8, 1, 1, 0, 0, 8, t4.MMA, 8, 1, 1, 0, 0]
    layer = Int4TritonLinear(qt, dtype=torch.float32, plan=plan)
    assert layer.plan[-t4.ENTRY + 1] == t4.TINYGEMM and layer.tinygemm_weight is not None
    x = torch.randn(12, 256)
    assert torch.equal(layer(x), Int4Linear(qt, dtype=torch.float32)(x))
