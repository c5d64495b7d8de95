"""report.json is strict JSON with the versioned keys and round-trips."""

from __future__ import annotations

import json

import pytest

from lorafast_export.errors import InputError
from lorafast_export.report.json_report import parse_report, read_json, to_json, write_json
from lorafast_export.report.schema import SCHEMA_ID

STAGE_KEYS = {
    "name",
    "eval_set",
    "tokens",
    "kl_mean",
    "kl_sem",
    "kl_median",
    "kl_p90",
    "kl_p99",
    "kl_max",
    "top1",
    "ppl",
    "ppl_ratio",
    "dp_mean",
    "dp_p1",
    "dp_p99",
    "dp_rms",
    "greedy_match",
    "first_divergence_mean",
    "vs_previous",
    "kl_by_position",
    "kl_hist",
}


def _strict_loads(text: str) -> dict:
    def reject(token: str):
        raise ValueError(f"non-standard JSON constant {token}")

    return json.loads(text, parse_constant=reject)


def test_valid_json_with_required_keys(sample_report, tmp_path):
    path = write_json(sample_report, tmp_path / "report.json")
    data = _strict_loads(path.read_text())
    assert data["schema"] == SCHEMA_ID
    assert set(data) == {
        "schema",
        "artifact",
        "eval_sets",
        "stages",
        "adapter_gain_retained",
        "layer_weight_error",
        "gates",
        "passed",
    }
    assert set(data["artifact"]) == {"name", "target", "quant", "runtime_note", "validation_note"}
    assert data["artifact"]["runtime_note"] is None  # set only when the target's runtime did not run
    assert data["artifact"]["validation_note"] is None  # set only when part of validation was skipped
    assert {e["name"]: e["tokens"] for e in data["eval_sets"]} == {"prose": 248, "code": 248}
    for stage in data["stages"]:
        assert set(stage) == STAGE_KEYS
        assert set(stage["vs_previous"]) >= {"against", "kl_mean", "top1"}
        assert stage["kl_by_position"] and set(stage["kl_hist"]) == {
            "edges",
            "counts",
            "underflow",
            "overflow",
        }
    assert set(data["adapter_gain_retained"]) == {"merged-fp32", "merged-fp16", "quantized", "artifact"}
    assert {"module", "layer", "rel_error"} == set(data["layer_weight_error"][0])
    for gate in data["gates"]:
        assert {"expr", "value", "passed", "threshold", "op", "metric", "stage", "eval_set"} <= set(gate)
    assert data["passed"] is True
    assert read_json(path) == sample_report


def test_schema_mismatch_and_bad_files(sample_report, tmp_path):
    data = json.loads(to_json(sample_report))
    with pytest.raises(InputError, match="expected 'lorafast-export/report/v1'"):
        parse_report({**data, "schema": "lorafast-export/report/v0"})
    data["stages"][0]["kl_mean"] = "lots"
    with pytest.raises(InputError, match=r"stages\.0\.kl_mean"):
        parse_report(data)
    with pytest.raises(InputError, match="not valid JSON"):
        parse_report("{nope")
    with pytest.raises(InputError, match="does not exist"):
        read_json(tmp_path / "missing.json")


def test_reports_are_read_only_from_regular_files_of_bounded_size(tmp_path):
    """`report diff` on a FIFO or /dev/zero would read forever; a binary file is not a report (issue 16 #5)."""
    import os

    os.mkfifo(tmp_path / "pipe.json")
    with pytest.raises(InputError, match="a FIFO"):
        read_json(tmp_path / "pipe.json")
    (tmp_path / "zero.json").symlink_to("/dev/zero")
    with pytest.raises(InputError, match="a device"):
        read_json(tmp_path / "zero.json")
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(InputError, match="not UTF-8"):
        read_json(tmp_path / "bin.json")
    with open(tmp_path / "huge.json", "wb") as f:
        f.truncate(65 << 20)
    with pytest.raises(InputError, match="a report is at most"):
        read_json(tmp_path / "huge.json")
