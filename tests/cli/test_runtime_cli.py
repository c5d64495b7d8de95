"""`run` and `bench` on a torch-compile artifact."""

import json

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
