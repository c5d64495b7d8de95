"""`generate` streams a prompt file through an artifact's runtime and resumes after an interruption."""

import json

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
