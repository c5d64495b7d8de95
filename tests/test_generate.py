"""`generate` streams a prompt file through an artifact's runtime and resumes after an interruption."""

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from lorafast_export.cli import main
from lorafast_export.model.decoder import load_decoder
from lorafast_export.validate.candidates import decoder_greedy
from lorafast_export.weights import open_model
from tests.merge.test_merge_vs_peft import ALL
from tests.tiny import save_base_and_adapter


def test_generate_matches_decoder_and_resumes(tmp_path):
    save_base_and_adapter(tmp_path, target_modules=ALL)
    r = CliRunner().invoke(
        main,
        [
            "-q",
            "build",
            "--base",
            str(tmp_path / "base"),
            "--adapter",
            str(tmp_path / "ad"),
            "--out",
            str(tmp_path / "art"),
            "--no-validate",
        ],
    )
    assert r.exit_code == 0, r.output
    prompts = [f"the model {i}" for i in range(5)]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    out = tmp_path / "o.jsonl"
    # a previous run was killed after two records, mid-way through writing the third
    dec = load_decoder(open_model(tmp_path / "art" / "model"))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "art" / "model")
    expect = [decoder_greedy(dec, tok(p)["input_ids"], 6) for p in prompts]
    out.write_text(
        "".join(
            json.dumps({"id": i + 1, "prompt": prompts[i], "completion": "", "tokens": expect[i]}) + "\n"
            for i in range(2)
        )
        + '{"id": 3, "pro'
    )
    args = [
        "--json",
        "generate",
        "--artifact",
        str(tmp_path / "art"),
        "--input",
        str(tmp_path / "p.jsonl"),
        "--output",
        str(out),
        "--max-new-tokens",
        "6",
        "--batch-size",
        "2",
    ]
    r = CliRunner().invoke(main, args, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["resumed_from"] == 2 and res["generated"] == 3
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [x["id"] for x in recs] == [1, 2, 3, 4, 5]
    assert [x["tokens"] for x in recs] == expect  # the transformers session's greedy tokens = our decoder's


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    save_base_and_adapter(root, target_modules=["q_proj"])
    args = [
        "-q",
        "build",
        "--base",
        root / "base",
        "--adapter",
        root / "ad",
        "--out",
        root / "art",
        "--no-validate",
    ]
    assert CliRunner().invoke(main, [str(a) for a in args]).exit_code == 0
    return root / "art"


def tc_artifact(tmp_path, *options):
    """(a root whose art/ is a torch-compile artifact of a tiny fine-tune, built with these --target-option
    KEY=VALUE, a prompt file of 3 prompts)."""
    root = tmp_path / "tc"
    save_base_and_adapter(root, target_modules=["q_proj"])
    build = ["-q", "build", "--base", root / "base", "--adapter", root / "ad", "--out", root / "art"]
    build += ["--target", "torch-compile", "--no-validate"]
    build += [x for o in options for x in ("--target-option", o)]
    assert CliRunner().invoke(main, [str(a) for a in build]).exit_code == 0
    inp = tmp_path / "p.jsonl"
    inp.write_text("".join(json.dumps({"prompt": f"the model {i}"}) + "\n" for i in range(3)))
    return root, inp


def gen(artifact, inp, out, *extra):
    args = ["--json", "generate", "--artifact", artifact, "--input", inp, "--output", out]
    args += list(extra) or ["--max-new-tokens", "2"]
    return CliRunner().invoke(main, [str(a) for a in args])


def test_output_equal_to_input_is_refused_and_the_input_kept(artifact, tmp_path):
    """Issue 16 #2: the same file, a symbolic link to it, or a hard link: exit 2, not one byte changed."""
    inp = tmp_path / "p.jsonl"
    inp.write_bytes(b'{"prompt": "the model"}')  # no final newline: the old code truncated it away
    (tmp_path / "sym.jsonl").symlink_to(inp)
    os.link(inp, tmp_path / "hard.jsonl")
    for out in (inp, tmp_path / "sym.jsonl", tmp_path / "hard.jsonl", tmp_path / "." / "p.jsonl"):
        r = gen(artifact, inp, out)
        assert r.exit_code == 2 and "--output is the --input file" in r.output, r.output
        assert inp.read_bytes() == b'{"prompt": "the model"}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hard.jsonl", "p.jsonl", "sym.jsonl"]


def test_an_output_that_is_not_a_generate_output_is_left_alone(artifact, tmp_path):
    inp = tmp_path / "p.jsonl"
    inp.write_text('{"prompt": "the model"}\n')
    for content in (b"\x00\x01 weights\n\xff", b"# my notes\nkeep me\n", b'{"no_id": 1}\n', b'{"id": [1]}\n'):
        out = tmp_path / "o.jsonl"
        out.write_bytes(content)
        r = gen(artifact, inp, out)
        assert r.exit_code == 2 and "not a generate output" in r.output and str(out) in r.output, r.output
        assert out.read_bytes() == content
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.jsonl", "p.jsonl"]


def test_a_killed_run_resumes_from_its_partial(artifact, tmp_path):
    """SIGKILL leaves `.o.jsonl.partial-PID` (the output itself was never written in place): resumed from it."""
    inp = tmp_path / "p.jsonl"
    inp.write_text("".join(json.dumps({"prompt": f"the model {i}"}) + "\n" for i in range(4)))
    out = tmp_path / "o.jsonl"
    rec = [
        json.dumps({"id": i, "prompt": f"the model {i - 1}", "completion": "", "tokens": [1]})
        for i in (1, 2, 3)
    ]
    out.write_text(rec[0] + "\n")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / f".o.jsonl.partial-{dead.pid}").write_text(
        rec[0] + "\n" + rec[1] + "\n" + rec[2] + "\n" + '{"id": 4'
    )
    r = gen(artifact, inp, out)
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["resumed_from"] == 3
    assert [json.loads(x)["id"] for x in out.read_text().splitlines()] == [1, 2, 3, 4]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.jsonl", "p.jsonl"]


def test_prompt_ids_must_be_strings_or_integers(artifact, tmp_path):
    inp = tmp_path / "p.jsonl"
    inp.write_text('{"prompt": "x", "id": {"a": 1}}\n')
    r = gen(artifact, inp, tmp_path / "o.jsonl")
    assert r.exit_code == 2 and f"{inp}:1: 'id' must be a string or an integer" in r.output, r.output


def test_draft_gives_the_same_completions_and_is_refused_off_torch_compile(artifact, tmp_path):
    """`generate --draft`: speculative decoding leaves the greedy output unchanged (the torch-compile
    artifact drafting for itself); an artifact of another target refuses --draft with exit 2."""
    root, inp = tc_artifact(tmp_path)
    r = gen(root / "art", inp, tmp_path / "spec.jsonl", "--draft", root / "art", "--max-new-tokens", "6")
    assert r.exit_code == 0, r.output
    plain = gen(root / "art", inp, tmp_path / "plain6.jsonl", "--max-new-tokens", "6")
    assert plain.exit_code == 0
    tokens = [
        [json.loads(x)["tokens"] for x in (tmp_path / f).read_text().splitlines()]
        for f in ("plain6.jsonl", "spec.jsonl")
    ]
    assert tokens[0] == tokens[1] and all(len(t) == 6 for t in tokens[0])
    r = gen(artifact, inp, tmp_path / "o.jsonl", "--draft", root / "art")
    assert r.exit_code == 2 and "speculative decoding runs on torch-compile artifacts" in r.output, r.output


def test_generate_loads_on_the_device_asked_with_the_batch_as_max_batch(tmp_path, monkeypatch):
    """`generate --device` reaches the artifact's runtime (it had no such option: on a GPU machine an 8B file was
    generated on the CPU), and a torch-compile runtime is loaded with max_batch = --batch-size, so that its warm-up
    compiles no larger bucket; the completions are those of the default batch size."""
    from lorafast_export.targets.torch_compile.target import TorchCompileTarget

    root, inp = tc_artifact(tmp_path)
    seen, real = [], TorchCompileTarget.load

    def spy(self, model_dir, device="cpu", draft=None, **overrides):
        session = real(self, model_dir, device, draft, **overrides)
        seen.append((device, overrides.get("max_batch"), session.runtime.engine.buckets))
        return session

    monkeypatch.setattr(TorchCompileTarget, "load", spy)
    r = gen(
        root / "art",
        inp,
        tmp_path / "b2.jsonl",
        "--device",
        "cpu",
        "--batch-size",
        "2",
        "--max-new-tokens",
        "5",
    )
    assert r.exit_code == 0, r.output
    assert gen(root / "art", inp, tmp_path / "b16.jsonl", "--max-new-tokens", "5").exit_code == 0
    assert seen == [("cpu", 2, (1, 2)), ("cpu", 16, (1, 2, 4, 8, 16))]
    tokens = [
        [json.loads(x)["tokens"] for x in (tmp_path / f).read_text().splitlines()]
        for f in ("b2.jsonl", "b16.jsonl")
    ]
    assert tokens[0] == tokens[1] and all(len(t) == 5 for t in tokens[0])


def test_generate_keeps_an_artifacts_smaller_max_batch(tmp_path, monkeypatch):
    """An artifact built with max_batch 4 is not loaded with more rows than that by a larger --batch-size."""
    from lorafast_export.targets.torch_compile.target import TorchCompileTarget

    root, inp = tc_artifact(tmp_path, "max_batch=4")
    seen, real = [], TorchCompileTarget.load
    monkeypatch.setattr(
        TorchCompileTarget,
        "load",
        lambda self, *a, **kw: seen.append(kw.get("max_batch")) or real(self, *a, **kw),
    )
    assert gen(root / "art", inp, tmp_path / "o.jsonl", "--max-new-tokens", "3").exit_code == 0
    assert seen == [4]
