"""The stage cache (issue 16 #3, #15): entries are verified on every use, damaged ones rebuilt with a warning;
partials of dead processes are removed; two builds finishing the same entry share one."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

from lorafast_export.safeio import sha256_file
from lorafast_export.stagecache import StageCache, cache_root, entry_problem, seal
from tests.test_output_safety import build, inputs  # noqa: F401 - the module-scoped tiny base + adapter


def merged_entries():
    return sorted(p for p in (cache_root() / "stages" / "merged").iterdir() if p.is_dir())


def test_a_flipped_byte_in_the_cache_is_caught_and_rebuilt(inputs, tmp_path, caplog):  # noqa: F811
    assert build(inputs, tmp_path / "clean", "--no-cache").exit_code == 0
    assert build(inputs, tmp_path / "a").exit_code == 0
    (entry,) = merged_entries()
    shard = entry / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x40  # a weight's byte: still a valid safetensors file
    shard.write_bytes(bytes(data))
    assert "model.safetensors changed since it was written" in entry_problem(entry)
    with caplog.at_level(logging.WARNING, logger="lorafast_export.stagecache"):
        assert build(inputs, tmp_path / "b").exit_code == 0
    assert "is damaged (model.safetensors changed since it was written); rebuilding it" in caplog.text
    clean = sha256_file(tmp_path / "clean" / "model" / "model.safetensors")
    assert sha256_file(tmp_path / "b" / "model" / "model.safetensors") == clean
    assert entry_problem(entry) is None  # the rebuilt entry is whole again


def test_added_or_missing_files_and_a_missing_record_are_damage(inputs, tmp_path):  # noqa: F811
    assert build(inputs, tmp_path / "a").exit_code == 0
    (entry,) = merged_entries()
    (entry / "extra.bin").write_bytes(b"x")
    assert "extra.bin" in entry_problem(entry)
    (entry / "extra.bin").unlink()
    (entry / "config.json").unlink()
    assert "config.json" in entry_problem(entry)
    (entry / ".entry.json").unlink()
    assert "no valid record" in entry_problem(entry)
    assert build(inputs, tmp_path / "b").exit_code == 0 and entry_problem(entry) is None


def test_partials_of_dead_processes_are_removed_live_ones_kept(tmp_path):
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stage = cache_root() / "stages" / "merged"
        stage.mkdir(parents=True)
        dead_dir, live_dir = stage / f".k1.partial-{done.pid}", stage / f".k2.partial-{live.pid}"
        dead_dir.mkdir()
        live_dir.mkdir()
        cache = StageCache(True, tmp_path)
        with cache.entry("merged", "k3") as (path, hit):
            assert not hit
            path.mkdir()  # the stage creates its directory
            (path / "f").write_bytes(b"1")
        assert not dead_dir.exists() and live_dir.exists()
        assert (stage / "k3" / "f").read_bytes() == b"1"
    finally:
        live.kill()
        live.wait()


def test_two_builds_finishing_the_same_entry_share_the_first(tmp_path):
    cache = StageCache(True, tmp_path)
    final = cache.path("merged", "k")
    with cache.entry("merged", "k") as (ours, hit):
        assert not hit
        ours.mkdir()
        (ours / "f").write_bytes(b"ours")
        # meanwhile another build with the same inputs finished the same entry and published it
        theirs = final.parent / ".k.partial-theirs"
        theirs.mkdir()
        (theirs / "f").write_bytes(b"theirs")
        seal(theirs)
        theirs.rename(final)
    assert (final / "f").read_bytes() == b"theirs" and entry_problem(final) is None
    assert os.listdir(final.parent) == ["k"]  # our partial is gone


def test_a_cache_that_cannot_be_created_is_a_clear_error(inputs, tmp_path, monkeypatch):  # noqa: F811
    (tmp_path / "cachefile").write_text("x")
    monkeypatch.setenv("LORAFAST_CACHE", str(tmp_path / "cachefile"))
    r = build(inputs, tmp_path / "art")
    assert r.exit_code == 2 and "cannot create the stage cache" in r.output and "--no-cache" in r.output, (
        r.output
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cachefile"]
