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


def test_dry_run_writes_a_table_the_planner_reads_and_a_second_model_adds_to_it(tmp_path, cache):
    r = _tune("--model", _model(tmp_path), "--rows", "1", "--quick", "--dry-run")
    assert r.exit_code == 0, r.output
    res = json.loads(r.output)
    assert res["shapes"] == [f"{n}x{k}" for n, k in SHAPES] and res["skipped_by_budget"] == []
    path = user_table_file("cpu-interpreter")
    assert res["table"] == str(path) and path.is_file()
    table = load_table("cpu-interpreter")
    assert table == json.loads(path.read_text())
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


def test_an_unmeasured_gpu_says_once_how_to_measure_it(monkeypatch, caplog, cache):
    """A GPU without a table entry for a layer keeps tinygemm, and says once a process how to measure one."""
    from lorafast_export.quant.rtn import quantize_rtn
    from lorafast_export.runtime import linear

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA Unmeasured 9000")
    monkeypatch.setattr(linear, "_UNMEASURED", set())
    qt = quantize_rtn(torch.randn(256, 128), 4, 128, False, scale_dtype=torch.float16)
    with caplog.at_level("WARNING", logger="lorafast_export.runtime.linear"):
        for _ in range(2):
            assert linear._table_plan(qt, "cuda", torch.bfloat16) is None
    said = [r.getMessage() for r in caplog.records if "tune-kernels" in r.getMessage()]
    assert len(said) == 1 and "Unmeasured 9000" in said[0] and "[256, 128]" in said[0]


def test_doctor_says_where_the_int4_kernel_choices_come_from(cache):
    from lorafast_export.inspection import int4_table_status

    assert int4_table_status("NVIDIA H200").startswith("shipped (int4_h200.json)")
    assert "tune-kernels --model" in int4_table_status("NVIDIA Unmeasured 9000")
    path = user_table_file("NVIDIA Unmeasured 9000")
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"shapes": []}))
    assert int4_table_status("NVIDIA Unmeasured 9000") == f"measured here by tune-kernels ({path})"
