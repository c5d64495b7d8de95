"""Interruptions (SIGKILL at many points), the stage cache, reproducible model files, verify, disk full."""

import errno
import hashlib
import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from lorafast_export.cli import main
from tests.merge.test_merge_vs_peft import ALL
from tests.tiny import save_base_and_adapter, write_text


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("rel")
    save_base_and_adapter(root, target_modules=ALL)
    write_text(root / "eval.txt")
    (root / "prompts.txt").write_text("the model\n")
    return root


def build_args(inputs, out, *extra):
    return [
        "build",
        "--base",
        inputs / "base",
        "--adapter",
        inputs / "ad",
        "--out",
        out,
        "--eval",
        f"e={inputs / 'eval.txt'}",
        "--max-tokens",
        "300",
        "--prompts",
        inputs / "prompts.txt",
        *extra,
    ]


def run_cli(args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "lorafast_export.cli", *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )


def model_hashes(out):
    return {
        p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted((out / "model").rglob("*"))
        if p.is_file()
    }


def test_sigkill_at_every_point_never_leaves_a_finished_looking_artifact(inputs, tmp_path):
    out = tmp_path / "art"
    killed = 0
    for point in range(1, 40):
        r = run_cli(["-q", *build_args(inputs, out)], {"LORAFAST_FAULT_KILL_AT": str(point)})
        if r.returncode == 0:  # the build has fewer progress events than `point`: it finished
            break
        assert r.returncode == -9, (point, r.returncode, r.stderr[-2000:])
        killed += 1
        assert not out.exists(), f"killed at event {point}: {out} must not exist"
        assert not (tmp_path / "manifest.json").exists()
    assert killed >= 10, f"only {killed} kill points exercised"
    assert (out / "manifest.json").exists() and (out / "report.json").exists()
    man = json.loads((out / "manifest.json").read_text())
    assert (
        man["facts"]["merge"]["cached"] is True
    )  # the rerun reused the merge finished by an earlier attempt
    assert not list(tmp_path.glob(".art.partial-*"))  # stale staging directories were cleaned up
    assert run_cli(["verify", out]).returncode == 0


def test_builds_are_byte_identical_and_verify_catches_changes(inputs, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        r = CliRunner().invoke(main, [str(x) for x in build_args(inputs, out, "--no-validate", "--no-cache")])
        assert r.exit_code == 0, r.output
    assert model_hashes(a) == model_hashes(b) and model_hashes(a)
    assert CliRunner().invoke(main, ["verify", str(a)]).exit_code == 0
    (a / "model" / "config.json").write_text("{}")
    (a / "model" / "stray.bin").write_bytes(b"x")
    r = CliRunner().invoke(main, ["--json", "verify", str(a)])
    res = json.loads(r.stdout)
    assert (
        r.exit_code == 1 and res["changed"] == ["model/config.json"] and res["extra"] == ["model/stray.bin"]
    )


def test_verify_refuses_paths_escaping_the_artifact(inputs, tmp_path):
    out = tmp_path / "a"
    assert CliRunner().invoke(main, [str(x) for x in build_args(inputs, out, "--no-validate")]).exit_code == 0
    man = json.loads((out / "manifest.json").read_text())
    man["files"].append({"path": "../../etc/passwd", "sha256": "0" * 64})
    (out / "manifest.json").write_text(json.dumps(man))
    r = CliRunner().invoke(main, ["verify", str(out)])
    assert r.exit_code == 2 and "escapes the artifact directory" in r.output


def test_disk_full_mid_write_is_a_clear_error_and_leaves_nothing(inputs, tmp_path, monkeypatch):
    from lorafast_export import checkpoint

    def full(self):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.out_dir / "model.safetensors"))

    monkeypatch.setattr(checkpoint.ShardWriter, "_flush", full)
    before = sorted(p.name for p in tmp_path.iterdir())
    r = CliRunner().invoke(
        main, [str(x) for x in build_args(inputs, tmp_path / "x", "--no-validate", "--no-cache")]
    )
    assert r.exit_code == 2 and "no space left on device" in r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_matrix_builds_every_combination_and_summarises(inputs, tmp_path):
    args = build_args(inputs, tmp_path / "m", "--matrix", "dtype=float32,float16", "target=hf")
    r = CliRunner().invoke(main, ["--json", *map(str, args)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    summary = json.loads((tmp_path / "m" / "summary.json").read_text())
    assert [a["name"] for a in summary["artifacts"]] == ["float32-hf", "float16-hf"]
    assert all(a["passed"] for a in summary["artifacts"])
    for a in summary["artifacts"]:
        assert (tmp_path / "m" / a["name"] / "report.json").exists()
    assert "float16-hf" in (tmp_path / "m" / "summary.md").read_text()
    bad = CliRunner().invoke(
        main, [str(x) for x in build_args(inputs, tmp_path / "n", "--matrix", "colour=red")]
    )
    assert bad.exit_code == 2 and "unknown axis" in bad.output


def test_quantized_builds_reuse_the_quantize_stage_and_write_no_merged_copy(inputs, tmp_path):
    """The quantize stage is content-addressed like the merge; quantized builds merge on read (no merged copy)."""
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        r = CliRunner().invoke(
            main, [str(x) for x in build_args(inputs, out, "--quant", "int8", "--no-validate")]
        )
        assert r.exit_code == 0, r.output
    facts = [json.loads((out / "manifest.json").read_text())["facts"] for out in outs]
    assert [f["quant"]["cached"] for f in facts] == [False, True]
    assert [f["merge"]["written"] for f in facts] == [False, False]
    assert model_hashes(outs[0]) == model_hashes(outs[1]) and model_hashes(outs[0])
    stages = os.path.join(os.environ["LORAFAST_CACHE"], "stages")
    assert os.listdir(os.path.join(stages, "quantized")) and not os.path.exists(
        os.path.join(stages, "merged")
    )
    # a different quant setting is a different entry, not a stale hit
    r = CliRunner().invoke(
        main,
        [
            str(x)
            for x in build_args(
                inputs, tmp_path / "c", "--quant", "rtn", "--group-size", "32", "--no-validate"
            )
        ],
    )
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "c" / "manifest.json").read_text())["facts"]["quant"]["cached"] is False
    assert len(os.listdir(os.path.join(stages, "quantized"))) == 2
