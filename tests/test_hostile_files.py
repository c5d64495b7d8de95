"""Only regular files are read, within the size their format implies (issue 16 #5), and a shard index may not
name shards outside the model directory (#7). Each case: exit 2, the file named, nothing left behind."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from lorafast_export.cli import main
from tests.tiny import save_base_and_adapter


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    save_base_and_adapter(root, target_modules=["q_proj", "v_proj"])
    return root


def fifo(p: Path) -> None:
    p.unlink(missing_ok=True)
    os.mkfifo(p)


def dev_zero(p: Path) -> None:
    p.unlink(missing_ok=True)
    p.symlink_to("/dev/zero")


def huge(p: Path) -> None:
    with open(p, "wb") as f:
        f.truncate(17 << 20)  # sparse: 17 MiB of zeros on disk for free


def shard_out(base: Path) -> None:
    """A sharded checkpoint whose index points one directory up (the shard really exists there)."""
    st = base / "model.safetensors"
    shutil.move(st, base.parent / "elsewhere.safetensors")
    from safetensors import safe_open

    with safe_open(str(base.parent / "elsewhere.safetensors"), "pt") as f:
        keys = list(f.keys())
    index = {"metadata": {}, "weight_map": {k: "../elsewhere.safetensors" for k in keys}}
    (base / "model.safetensors.index.json").write_text(json.dumps(index))


CASES = {
    "config-fifo": ("base", "config.json", fifo, "a FIFO (named pipe), not a regular file"),
    "config-dev-zero": ("base", "config.json", dev_zero, "is a device, not a regular file"),
    "config-huge": ("base", "config.json", huge, "a config.json is at most 16,777,216"),
    "config-directory": ("base", "config.json", lambda p: (p.unlink(), p.mkdir()), "is a directory"),
    "adapter-config-fifo": ("ad", "adapter_config.json", fifo, "a FIFO"),
    "adapter-config-huge": ("ad", "adapter_config.json", huge, "at most 16,777,216"),
    "tokenizer-fifo": ("base", "tokenizer.json", fifo, "tokenizer file is a FIFO"),
    "weights-dev-zero": ("base", "model.safetensors", dev_zero, "safetensors file is a device"),
    "adapter-weights-fifo": ("ad", "adapter_model.safetensors", fifo, "safetensors file is a FIFO"),
    "shard-index-climbs-out": ("base", None, shard_out, "names shard(s) outside the model directory"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_input_files(good, tmp_path, case):
    which, name, spoil, expect = CASES[case]
    root = tmp_path / "in"
    for d in ("base", "ad"):
        shutil.copytree(good / d, root / d)
    spoil(root / which / name if name else root / which)
    before = sorted(p.name for p in tmp_path.iterdir())
    args = [
        "build",
        "--base",
        root / "base",
        "--adapter",
        root / "ad",
        "--out",
        tmp_path / "out",
        "--no-validate",
    ]
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exit_code == 2, (r.exit_code, r.output)
    assert expect in r.output and str(root / which) in r.output, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.parametrize("spoil", [fifo, dev_zero])
def test_text_inputs_must_be_regular_files(good, tmp_path, spoil):
    """eval, calibration and prompt files too: never read from a pipe or device."""
    for flag, what in (
        ("--eval", "eval file"),
        ("--calib", "calibration file"),
        ("--prompts", "prompts file"),
    ):
        p = tmp_path / f"{flag[2:]}.txt"
        spoil(p)
        args = [
            "build",
            "--base",
            good / "base",
            "--adapter",
            good / "ad",
            "--out",
            tmp_path / "out",
            flag,
            p,
        ]
        args += ["--quant", "gptq"] if flag == "--calib" else []
        r = CliRunner().invoke(main, [str(a) for a in args])
        assert r.exit_code == 2 and str(p) in r.output and "not a regular file" in r.output, (flag, r.output)
        assert what in r.output, r.output
