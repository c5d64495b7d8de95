"""The output side of a build (issue 16): --force deletes only our artifacts, one build per output at a time,
SIGTERM unwinds like Ctrl-C, partials of dead processes are cleaned, `~` is expanded, artifacts get the umask's
modes, and validate --artifact works from any directory."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from lorafast_export import errors
from lorafast_export.cli import _raise_terminated, main
from lorafast_export.outdir import output_lock, publish
from tests.tiny import save_base_and_adapter, write_text


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("outsafe")
    save_base_and_adapter(root, target_modules=["q_proj", "v_proj"])
    write_text(root / "eval.txt")
    (root / "prompts.txt").write_text("the model\n")
    return root


def build(inputs, out, *extra):
    args = [
        "build",
        "--base",
        inputs / "base",
        "--adapter",
        inputs / "ad",
        "--out",
        out,
        "--no-validate",
        *extra,
    ]
    return CliRunner().invoke(main, [str(a) for a in args])


def tree(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# ------------------------------------------------------------------------------------------- 1: --force


def test_force_never_deletes_a_directory_whose_manifest_is_not_ours(inputs, tmp_path):
    """A web app's folder with its own manifest.json: refused, exit 2, every byte as it was."""
    app = tmp_path / "webapp"
    app.mkdir()
    (app / "manifest.json").write_text('{"name": "my pwa", "start_url": "/"}')
    (app / "index.html").write_text("<html>")
    before = tree(app)
    r = build(inputs, app, "--force")
    assert r.exit_code == 2 and "manifest.json that is not ours" in r.output, r.output
    assert "nothing was touched" in r.output and tree(app) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["webapp"]


def test_force_never_deletes_files_the_manifest_does_not_list(inputs, tmp_path):
    out = tmp_path / "art"
    assert build(inputs, out).exit_code == 0
    (out / "serve.sh").write_text("#!/bin/sh\n")  # the user's own file, added next to the artifact
    before = tree(out)
    r = build(inputs, out, "--force")
    assert r.exit_code == 2 and "holds files its manifest does not list (serve.sh)" in r.output, r.output
    assert tree(out) == before
    (out / "serve.sh").unlink()
    assert build(inputs, out, "--force").exit_code == 0  # our own artifact, nothing else: replaced


def test_force_refuses_a_link(inputs, tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    r = build(inputs, tmp_path / "link", "--force")
    assert r.exit_code == 2 and "is a symbolic link" in r.output
    assert (tmp_path / "link").is_symlink() and (tmp_path / "real").is_dir()


def test_the_merge_command_output_is_an_artifact_it_can_replace(inputs, tmp_path):
    out = tmp_path / "merged"
    args = ["merge", "--base", inputs / "base", "--adapter", inputs / "ad", "--out", out]
    assert CliRunner().invoke(main, [str(a) for a in args]).exit_code == 0
    assert CliRunner().invoke(main, ["verify", str(out)]).exit_code == 0
    r = CliRunner().invoke(main, [str(a) for a in [*args, "--force"]])
    assert r.exit_code == 0, r.output


# ------------------------------------------------------------------------------------------- 14: lock


def test_a_second_build_into_the_same_output_stops_and_leaves_the_first_alone(inputs, tmp_path):
    """While another process holds the output (its lock, its staging dir), a build exits 2 and deletes nothing."""
    out = tmp_path / "art"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        theirs = tmp_path / f".art.partial-{holder.pid}"
        theirs.mkdir()
        (theirs / "half.safetensors").write_bytes(b"x")
        with output_lock(out):
            r = build(inputs, out)
        assert r.exit_code == 2 and "another lorafast-export process" in r.output, r.output
        assert (theirs / "half.safetensors").exists() and not out.exists()
        # once the lock is free, a build proceeds; the live process's partial is still not touched
        assert build(inputs, out).exit_code == 0
        assert (theirs / "half.safetensors").exists()
    finally:
        holder.kill()
        holder.wait()
    assert not (tmp_path / ".art.lock").exists()  # released locks leave no file


@pytest.mark.slow  # subprocess builds
def test_two_concurrent_builds_never_break_each_other(inputs, tmp_path):
    """Really concurrent: each either builds the artifact or is refused cleanly (exit 2); none fails (exit 3)."""
    out = tmp_path / "art"
    cmd = [sys.executable, "-m", "lorafast_export.cli", "-q", "build", "--base", str(inputs / "base")]
    cmd += ["--adapter", str(inputs / "ad"), "--out", str(out), "--no-validate", "--force"]
    procs = [subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(), p.stderr.read()) for p in procs]
    assert all(rc in (0, 2) for rc, _ in results), results
    assert any(rc == 0 for rc, _ in results), results
    for rc, err in results:
        assert rc == 0 or "another lorafast-export process" in err, err
    assert CliRunner().invoke(main, ["verify", str(out)]).exit_code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


# ------------------------------------------------------------------------------------------- 15: signals


@pytest.mark.slow  # subprocess builds
def test_sigterm_unwinds_like_ctrl_c(inputs, tmp_path):
    out = tmp_path / "art"
    cache = tmp_path / "cache"
    cmd = [sys.executable, "-m", "lorafast_export.cli", "build", "--base", str(inputs / "base")]
    cmd += ["--adapter", str(inputs / "ad"), "--out", str(out), "--eval", f"e={inputs / 'eval.txt'}"]
    env = {**os.environ, "LORAFAST_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    while not list(tmp_path.glob(".art.partial-*")) and time.time() < deadline and p.poll() is None:
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    rc, err = p.wait(), p.stderr.read()
    assert rc == 128 + signal.SIGTERM, (rc, err[-2000:])
    assert "interrupted (SIGTERM); nothing was published" in err
    assert {p.name for p in tmp_path.iterdir()} <= {"cache"}, "staging dir and lock removed"
    assert not [p for p in cache.rglob("*") if ".partial-" in p.name], "no cache partials left"


@pytest.fixture
def signal_record():
    assert errors.received_signals == []
    yield
    errors.received_signals.clear()  # this process goes on to other tests; the CLI's process would exit


def test_a_sigterm_raised_inside_a_class_definition_is_reported_as_the_signal(capsys):
    """A SIGTERM that arrives while an imported module defines its classes raises Terminated inside a __set_name__,
    which Python 3.11 wraps in a RuntimeError (3.12 re-raises it with a note): the command still exits 128 + 15
    with the interrupted message, not as an internal error (a failure of test_sigterm_unwinds_like_ctrl_c)."""
    from lorafast_export import cli

    class Knob:
        def __set_name__(self, owner, name):
            raise errors.Terminated(signal.SIGTERM)

    def define():
        type("Knobs", (), {"tool": Knob()})

    with pytest.raises(BaseException) as raised:
        define()
    assert cli._interrupt_behind(raised.value).signum == signal.SIGTERM  # wrapped (3.11) or not (3.12+)
    with pytest.raises(SystemExit) as e:
        cli._run(cli.Ctx(False, False, False), define)
    assert e.value.code == 128 + signal.SIGTERM
    assert "interrupted (SIGTERM); nothing was published" in capsys.readouterr().err
    assert cli._interrupt_behind(RuntimeError("a bug")) is None


def test_a_sigterm_whose_exception_was_swallowed_still_stops_the_publish(tmp_path, signal_record):
    """Python drops an exception raised while it runs a __del__ ("Exception ignored in ..."), so a SIGTERM handled
    there would not unwind; the handler's record makes publish() refuse all the same, leaving the old artifact."""
    out, stage = tmp_path / "art", tmp_path / ".art.partial-1"
    out.mkdir()
    (out / "old").write_text("kept")
    stage.mkdir()
    (stage / "new").write_text("x")

    class Swallows:
        def __del__(self):
            _raise_terminated(signal.SIGTERM, None)  # what the installed handler does, inside a destructor

    Swallows()  # the Terminated it raises is printed and dropped by Python
    with pytest.raises(errors.Terminated) as e:
        publish(stage, out)
    assert e.value.signum == signal.SIGTERM
    assert sorted(p.name for p in out.iterdir()) == ["old"] and stage.exists()


def test_partials_of_dead_processes_are_cleaned_and_a_lost_old_artifact_comes_back(inputs, tmp_path):
    out = tmp_path / "art"
    assert build(inputs, out).exit_code == 0
    dead = dead_pid()
    # killed between the two renames of a --force build: the old artifact sits at .art.old-PID, art is gone
    out.rename(tmp_path / f".art.old-{dead}")
    (tmp_path / f".art.partial-{dead}").mkdir()
    (tmp_path / f".art.partial-{dead}" / "junk").write_bytes(b"x")
    r = build(inputs, out)
    assert r.exit_code == 2 and "already exists" in r.output  # it came back: never silently replaced
    assert CliRunner().invoke(main, ["verify", str(out)]).exit_code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


# ------------------------------------------------------------------------------------------- 6, 21, 18


def test_tilde_in_the_output_is_the_home_directory(inputs, tmp_path, monkeypatch):
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    assert build(inputs, "~/art").exit_code == 0
    recipe = work / "r.yaml"
    recipe.write_text(
        f"version: 1\ninputs: {{base: {inputs / 'base'}, adapters: [{{path: {inputs / 'ad'}}}]}}\n"
        "validate: {enabled: false}\noutput: {dir: ~/art2}\n"
    )
    assert CliRunner().invoke(main, ["build", "--recipe", str(recipe)]).exit_code == 0
    assert (home / "art" / "manifest.json").is_file() and (home / "art2" / "manifest.json").is_file()
    assert sorted(p.name for p in work.iterdir()) == ["r.yaml"], "no literal ./~ directory"


def test_artifact_files_get_the_umask_modes(inputs, tmp_path):
    out = tmp_path / "art"
    old = os.umask(0o027)
    try:
        assert build(inputs, out).exit_code == 0
    finally:
        os.umask(old)
    modes = {p.relative_to(out).as_posix(): p.stat().st_mode & 0o777 for p in out.rglob("*")}
    assert modes["model/model.safetensors"] == 0o640, modes  # safetensors alone would write 0600
    assert set(modes.values()) == {0o640, 0o750}, modes


def test_doctor_shows_install_hints_with_their_brackets(monkeypatch):
    from lorafast_export import inspection

    def report():
        hint = "pip install 'lorafast-export[onnxruntime]'"
        return {
            "targets": [{"name": "onnxruntime", "ok": False, "hint": hint}],
            "quant_methods": [{"name": "gptq", "ok": False, "hint": "needs [calib] data"}],
            "devices": ["cpu"],
            "versions": {},
        }

    monkeypatch.setattr(inspection, "environment_report", report)
    r = CliRunner().invoke(main, ["doctor"], terminal_width=200)
    assert "pip install 'lorafast-export[onnxruntime]'" in r.output and "needs [calib] data" in r.output, (
        r.output
    )


@pytest.mark.slow  # subprocess builds
def test_validate_artifact_from_another_directory_and_it_still_verifies(inputs, tmp_path):
    """Relative input paths resolve from any directory (manifest input_paths); re-validation rewrites the reports
    and records their new hashes, so the artifact still verifies."""
    build_dir, elsewhere = tmp_path / "b", tmp_path / "elsewhere"
    build_dir.mkdir()
    elsewhere.mkdir()
    for name in ("base", "ad"):
        (build_dir / name).symlink_to(inputs / name)
    (build_dir / "eval.txt").write_text((inputs / "eval.txt").read_text())
    cli = [sys.executable, "-m", "lorafast_export.cli", "-q"]
    args = ["build", "--base", "base", "--adapter", "ad", "--out", "art", "--eval", "e=eval.txt"]
    args += ["--max-tokens", "200", "--prompts", str(inputs / "prompts.txt")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([*cli, *args], cwd=build_dir, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    man = json.loads((build_dir / "art" / "manifest.json").read_text())
    assert man["input_paths"]["inputs.base"] == {"absolute": str(build_dir / "base"), "relative": "../base"}
    r = subprocess.run(
        [*cli, "validate", "--artifact", str(build_dir / "art")],
        cwd=elsewhere,
        capture_output=True,
        text=True,
        env=env,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert subprocess.run([*cli, "verify", str(build_dir / "art")], env=env).returncode == 0


def test_a_planted_lock_link_is_never_written_through(inputs, tmp_path):
    victim = tmp_path / "notes.txt"
    victim.write_text("precious")
    (tmp_path / ".art.lock").symlink_to(victim)  # opening it to write our pid would truncate notes.txt
    r = build(inputs, tmp_path / "art")
    assert r.exit_code == 2 and ".art.lock: cannot use it as the output's lock file" in r.output, r.output
    assert victim.read_text() == "precious" and not (tmp_path / "art").exists()


def test_a_matrix_never_overwrites_a_summary_of_the_users(inputs, tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    (out / "summary.md").write_text("my own summary")
    for extra in ([], ["--force"]):
        r = build(inputs, out, "--matrix", "dtype=float32", *extra)
        assert r.exit_code == 2, r.output
        assert ("already exists" if not extra else "not a lorafast-export matrix summary") in r.output
        assert sorted(p.name for p in out.iterdir()) == ["summary.md"]
        assert (out / "summary.md").read_text() == "my own summary"
    (out / "summary.md").unlink()
    assert build(inputs, out, "--matrix", "dtype=float32").exit_code == 0
    assert build(inputs, out, "--matrix", "dtype=float32", "--force").exit_code == 0  # ours: replaced


def test_messages_name_the_output_not_its_staging_directory(tmp_path):
    """`shown_path` maps the build's staging directory `.<name>.partial-PID` (where validation reads the artifact)
    to the output it becomes, and leaves every other path alone."""
    from lorafast_export.outdir import shown_path, staged_output

    with staged_output(tmp_path / "dist", force=False) as stage:
        assert stage.name.startswith(".dist.partial-")
        assert shown_path(stage / "model") == tmp_path / "dist" / "model"
    for kept in ("a/.dist.partial-", "a/.dist.partial-1x/model", "a/dist.partial-3", "a/b"):
        assert shown_path(kept) == Path(kept)
