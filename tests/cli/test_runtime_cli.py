"""`run` and `bench` on a torch-compile artifact."""

import json
import re

import pytest
import torch
from click.testing import CliRunner

from lorafast_export.adapters import open_adapter
from lorafast_export.cli import main
from lorafast_export.merge import merge
from lorafast_export.model.decoder import load_decoder
from lorafast_export.validate.candidates import decoder_greedy
from lorafast_export.weights import open_model
from tests.merge.test_merge_vs_peft import ALL
from tests.tiny import save_base_and_adapter


def test_run_and_bench(tmp_path):
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
            "--target",
            "torch-compile",
            "--out",
            str(tmp_path / "tc"),
            "--no-validate",
        ],
    )
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(
        main,
        [
            "--json",
            "run",
            "--artifact",
            str(tmp_path / "tc"),
            "--prompt",
            "the model",
            "--max-new-tokens",
            "5",
        ],
        catch_exceptions=False,
    )
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(tmp_path / "base")("the model")["input_ids"]
    # reference: the canonical decoder on the merged weights
    merge(open_model(tmp_path / "base"), [open_adapter(str(tmp_path / "ad"))], tmp_path / "m")
    with torch.no_grad():
        expect = decoder_greedy(load_decoder(open_model(tmp_path / "m")), ids, 5)
    assert res["tokens"] == expect
    r = CliRunner().invoke(
        main,
        [
            "--json",
            "bench",
            "--artifact",
            str(tmp_path / "tc"),
            "--batch",
            "1,2",
            "--prompt-len",
            "8",
            "--new-tokens",
            "4",
        ],
        catch_exceptions=False,
    )
    assert r.exit_code == 0, r.output
    b = json.loads(r.stdout)
    assert [row["batch"] for row in b["results"]] == [1, 2]


def test_speculative_int4_drafts_with_the_artifact_itself(tmp_path):
    """`run` / `bench` / `generate --speculative int4`: the artifact drafts for itself with its linears quantized to
    int4 at load; the tokens are the model's own greedy ones, it speculated, and --draft with it is refused."""
    save_base_and_adapter(tmp_path, target_modules=ALL)
    build = (
        f"-q build --base {tmp_path}/base --adapter {tmp_path}/ad --target torch-compile --out {tmp_path}/tc"
    )
    r = CliRunner().invoke(main, [*build.split(), "--no-validate"])
    assert r.exit_code == 0, r.output

    def cli(*a):
        return CliRunner().invoke(main, [str(x) for x in a], catch_exceptions=False)

    run = ["--json", "run", "--artifact", tmp_path / "tc", "--prompt", "the model", "--max-new-tokens", "8"]
    plain, spec = cli(*run), cli(*run, "--speculative", "int4")
    assert plain.exit_code == 0 and spec.exit_code == 0, spec.output
    assert json.loads(spec.stdout)["tokens"] == json.loads(plain.stdout)["tokens"]
    b = cli("--json", "bench", "--artifact", tmp_path / "tc", "--batch", "1", "--prompt-len", "8",
            "--new-tokens", "6", "--speculative", "int4")  # fmt: skip
    assert b.exit_code == 0, b.output
    res = json.loads(b.stdout)
    assert (
        res["draft"].endswith("(its linears int4 at load)") and res["results"][0]["spec_rounds"] is not None
    )
    # the baseline: the artifact loaded alone (no draft: no rounds, no governor), and the speed-up over it
    (spec,), (alone,) = res["results"], res["plain"]
    assert alone["batch"] == 1 and alone["spec_rounds"] == 0 and alone["spec_decisions"] is None
    assert spec["decode_speedup"] == pytest.approx(spec["decode_tokens_per_s"] / alone["decode_tokens_per_s"])
    shown = cli("bench", "--artifact", tmp_path / "tc", "--batch", "1", "--prompt-len", "8", "--new-tokens", "6",
                "--speculative", "int4", "--runtime-option", "speculation=always")  # fmt: skip
    assert shown.exit_code == 0, shown.output
    assert "…" not in shown.output  # an 80-column log shows every header whole
    for head in ("decode", "TTFT median", "peak GiB", "acceptance", "rounds", "alone", "speed-up"):
        assert head in shown.output, shown.output
    assert re.search(r"│\s+1\s+│\s+\d+\.\d%\s+│\s+\d+\s+│[^│]+│[^│]+│\s+\d+\.\d\dx\s+│", shown.output), (
        shown.output
    )
    bare = cli("--json", "bench", "--artifact", tmp_path / "tc", "--batch", "1", "--prompt-len", "8",
               "--new-tokens", "6", "--speculative", "int4", "--no-baseline")  # fmt: skip
    assert bare.exit_code == 0, bare.output
    assert (
        "plain" not in json.loads(bare.stdout)
        and "decode_speedup" not in json.loads(bare.stdout)["results"][0]
    )
    both = cli(*run, "--speculative", "int4", "--draft", tmp_path / "tc")
    assert both.exit_code == 2 and "use one of them" in both.output
    (tmp_path / "in.jsonl").write_text(json.dumps({"prompt": "the model"}) + "\n")
    g = cli("--json", "generate", "--artifact", tmp_path / "tc", "--input", tmp_path / "in.jsonl", "--output",
            tmp_path / "out.jsonl", "--max-new-tokens", "8", "--speculative", "int4",
            "--runtime-option", "speculation=always")  # fmt: skip
    assert g.exit_code == 0, g.output
    written = json.loads((tmp_path / "out.jsonl").read_text())
    assert written["completion"] == json.loads(plain.stdout)["completion"]
    # the summary: the tokens as written, and this file's speculative rounds (not the load's warm-up)
    res, spec = json.loads(g.stdout), json.loads(g.stdout)["speculation"]
    assert res["new_tokens"] == len(written["tokens"]) and res["tokens_per_s"] > 0
    assert spec["rounds"] > 0 and 0 <= spec["accepted"] <= spec["drafted"] <= 4 * spec["rounds"]
    assert spec["acceptance"] == pytest.approx(spec["accepted"] / spec["drafted"])
    (tmp_path / "out.jsonl").unlink()
    alone = cli("generate", "--artifact", tmp_path / "tc", "--input", tmp_path / "in.jsonl", "--output",
                tmp_path / "out.jsonl", "--max-new-tokens", "8")  # fmt: skip
    said = " ".join(alone.output.split())  # the line as printed, wherever the console wrapped it
    assert alone.exit_code == 0 and f"; {len(written['tokens'])} tokens in" in said, said
    assert "speculation" not in said


def test_runtime_options_for_one_run(tmp_path):
    """`--runtime-option KEY=VALUE` sets a torch-compile runtime option for one run, bench or generate (values read
    as YAML), without a rebuild: the same tokens with decode_steps=1 as with the built default; a bad key or value
    is refused naming it (exit 2, bad input); on another target's artifact it is refused."""
    save_base_and_adapter(tmp_path, target_modules=ALL)
    for target, out in (("torch-compile", "tc"), ("hf", "hf")):
        build = f"-q build --base {tmp_path}/base --adapter {tmp_path}/ad --target {target} --out {tmp_path}/{out}"
        r = CliRunner().invoke(main, [*build.split(), "--no-validate"])
        assert r.exit_code == 0, r.output

    def cli(*a):
        return CliRunner().invoke(main, [str(x) for x in a])

    run = ["--json", "run", "--artifact", tmp_path / "tc", "--prompt", "the model", "--max-new-tokens", "6"]
    plain = cli(*run)
    steps1 = cli(*run, "--runtime-option", "decode_steps=1", "--runtime-option", "overlap_bursts=false")
    assert plain.exit_code == 0 and steps1.exit_code == 0, steps1.output
    assert json.loads(steps1.stdout)["tokens"] == json.loads(plain.stdout)["tokens"]
    b = cli("--json", "bench", "--artifact", tmp_path / "tc", "--batch", "1", "--prompt-len", "8",
            "--new-tokens", "12", "--speculative", "int4", "--runtime-option", "speculation=always")  # fmt: skip
    assert b.exit_code == 0, b.output
    assert json.loads(b.stdout)["results"][0]["spec_rounds"] > 0
    chunked = cli("--json", "bench", "--artifact", tmp_path / "tc", "--batch", "2", "--prompt-len", "8",
                  "--new-tokens", "4", "--runtime-option", "prefill_chunk=3")  # fmt: skip
    assert chunked.exit_code == 0, chunked.output
    assert json.loads(chunked.stdout)["results"][0]["prefill_chunks"] == 2 * 3  # two prompts of 8: 3 + 3 + 2
    bad = cli(*run, "--runtime-option", "prefill_chunk=-1")
    assert bad.exit_code == 2 and "prefill_chunk=-1" in bad.output
    bad = cli(*run, "--runtime-option", "fused_decoder=mma")
    assert bad.exit_code == 2 and "unknown key(s) fused_decoder" in bad.output
    bad = cli(*run, "--runtime-option", "fused_decode=fast")
    assert bad.exit_code == 2 and "fused_decode='fast': use one of" in bad.output
    bad = cli(*run, "--runtime-option", "fused_decode")
    assert bad.exit_code == 2 and "expected KEY=VALUE" in bad.output
    (tmp_path / "in.jsonl").write_text(json.dumps({"prompt": "the model"}) + "\n")
    gen = ["-q", "generate", "--input", tmp_path / "in.jsonl", "--max-new-tokens", "6"]
    g = cli(
        *gen,
        "--artifact",
        tmp_path / "tc",
        "--output",
        tmp_path / "o1.jsonl",
        "--runtime-option",
        "decode_steps=1",
    )
    assert g.exit_code == 0, g.output
    assert (
        json.loads((tmp_path / "o1.jsonl").read_text())["completion"]
        == json.loads(plain.stdout)["completion"]
    )
    g = cli(
        *gen,
        "--artifact",
        tmp_path / "hf",
        "--output",
        tmp_path / "o2.jsonl",
        "--runtime-option",
        "decode_steps=1",
    )
    assert g.exit_code == 2 and "runtime options are the torch-compile runtime's" in g.output
    assert not (tmp_path / "o2.jsonl").exists()
