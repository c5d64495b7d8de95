"""End to end: build --target hf validates the artifact stage by stage against the unmerged PEFT model."""

import json

import pytest
from click.testing import CliRunner

from lorafast_export.cli import main
from tests.merge.test_merge_vs_peft import ALL
from tests.tiny import save_base_and_adapter, write_text


@pytest.fixture()
def inputs(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAFAST_CACHE", str(tmp_path / "cache"))
    save_base_and_adapter(tmp_path, half_base=True, target_modules=ALL, use_dora=True)
    write_text(tmp_path / "a.txt", seed=1)
    write_text(tmp_path / "b.txt", seed=2)
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "the model"}\n{"prompt": "def merge"}\n')
    return tmp_path


def build(inputs, *extra):
    args = [
        "--json",
        "build",
        "--base",
        inputs / "base",
        "--adapter",
        inputs / "ad",
        "--out",
        inputs / "out",
        "--eval",
        f"a={inputs / 'a.txt'}",
        "--eval",
        f"b={inputs / 'b.txt'}",
        "--max-tokens",
        "1000",
        "--prompts",
        inputs / "prompts.jsonl",
        *extra,
    ]
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_build_validates_every_stage(inputs):
    r = build(inputs, "--gate", "stage:merged-fp32.kl_max<=1e-6", "--junit", "reports/junit.xml")
    assert r.exit_code == 0, r.output
    import xml.etree.ElementTree as ET

    # the JUnit file is part of the artifact: written in the staging directory, published with the rest
    cases = ET.parse(inputs / "out" / "reports" / "junit.xml").getroot().iter("testcase")
    assert [c.get("name") for c in cases] == [f"stage:merged-fp32.{e}.kl_max<=1e-06" for e in ("a", "b")]
    assert not (inputs / "reports").exists() and not list(inputs.glob(".out.*"))
    rep = json.loads((inputs / "out" / "report.json").read_text())
    names = [s["name"] for s in rep["stages"] if s["eval_set"] == "a"]
    assert names == ["merged-fp32", "merged-fp16", "artifact"]
    by = {(s["name"], s["eval_set"]): s for s in rep["stages"]}
    assert by[("merged-fp32", "a")]["kl_max"] < 1e-6  # exact merge
    assert 0 < by[("merged-fp16", "a")]["kl_mean"] < 1e-2  # fp16 weight rounding, visible but small
    # the artifact (transformers computing in fp16 on the fp16 checkpoint) adds only fp16 arithmetic error
    assert 0 < by[("artifact", "a")]["vs_previous"]["kl_mean"] < 1e-4
    assert by[("artifact", "a")]["greedy_match"] == 1.0
    assert rep["adapter_gain_retained"]["artifact"]["a"] == pytest.approx(1.0, abs=0.05)
    for f in ("report.md", "report.html", "manifest.json"):
        assert (inputs / "out" / f).exists()
    assert json.loads((inputs / "out" / "manifest.json").read_text())["passed"] is True


def test_failing_gate_exits_1_and_still_publishes_the_report(inputs):
    r = build(inputs, "--gate", "kl_mean<=1e-12")
    assert r.exit_code == 1, r.output
    rep = json.loads((inputs / "out" / "report.json").read_text())
    assert rep["passed"] is False and any(g["passed"] is False for g in rep["gates"])


def test_validate_command_and_report_diff(inputs):
    assert build(inputs, "--no-validate", "--junit", "build.xml").exit_code == 0
    assert not (inputs / "out" / "report.json").exists()
    args = [
        "validate",
        "--artifact",
        inputs / "out",
        "--eval",
        f"a={inputs / 'a.txt'}",
        "--max-tokens",
        "500",
        "--prompts",
        inputs / "prompts.jsonl",
        "--junit",
        "j.xml",
        "--gate",
        "top1>=0.99",
    ]
    r = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    import xml.etree.ElementTree as ET

    cases = ET.parse(inputs / "out" / "j.xml").getroot().iter("testcase")  # --junit is inside --artifact
    assert [c.get("name") for c in cases] == ["stage:artifact.a.top1>=0.99"]
    assert not (inputs / "out" / "build.xml").exists()  # the build's JUnit path is not re-used: only --junit
    # a failing gate: exit 1, and the diff of two reports
    (inputs / "out2").mkdir()
    import shutil

    shutil.copy(inputs / "out" / "report.json", inputs / "out2" / "report.json")
    r = CliRunner().invoke(main, ["report", "diff", str(inputs / "out"), str(inputs / "out2")])
    assert r.exit_code == 0 and "artifact" in r.output
    args[-1] = "kl_max<=0"
    assert CliRunner().invoke(main, [str(a) for a in args]).exit_code == 1


def test_revalidating_never_writes_through_a_planted_link(inputs):
    """A downloaded artifact whose report.md links to a file of yours: `validate` refuses, the file is intact."""
    assert build(inputs, "--no-validate").exit_code == 0
    victim = inputs / "victim.txt"
    victim.write_text("yours")
    (inputs / "out" / "report.md").symlink_to(victim)
    args = [
        "validate",
        "--artifact",
        inputs / "out",
        "--eval",
        f"a={inputs / 'a.txt'}",
        "--max-tokens",
        "500",
        "--prompts",
        inputs / "prompts.jsonl",
    ]
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exit_code == 2 and "'report.md' leaves the directory through a symbolic link" in r.output, (
        r.output
    )
    assert victim.read_text() == "yours"
    assert not (inputs / "out" / "report.json").exists()  # checked before anything was written


def test_report_says_when_our_reader_validated_the_artifact(inputs):
    """transformers cannot load a GPTQ checkpoint without GPTQModel: the artifact stage is our reader, and every
    report format says so."""
    try:
        import gptqmodel  # noqa: F401

        pytest.skip("GPTQModel is installed: transformers itself validates the checkpoint")
    except ImportError:
        pass
    from lorafast_export.targets.hf.target import QuantizedReaderSession

    r = build(inputs, "--quant", "rtn", "--group-size", "32", "--hf-format", "gptq", "--gate", "top1>=0")
    assert r.exit_code == 0, r.output
    note = QuantizedReaderSession.runtime_note
    out = inputs / "out"
    assert json.loads((out / "report.json").read_text())["artifact"]["runtime_note"] == note
    assert f"> **Note:** {note}" in (out / "report.md").read_text()
    assert 'class="runtime-note"' in (out / "report.html").read_text()
