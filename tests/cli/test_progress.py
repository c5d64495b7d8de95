"""Progress in CI logs: stderr that is not a terminal gets one line per stage and sub-step, with elapsed seconds;
a skipped stage has no check mark; transformers' loading bars and its llama3 rope warning stay out."""

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.tiny import save_base_and_adapter, write_text

LLAMA3_ROPE = {  # what Llama 3 ships: original_max_position_embeddings == max_position_embeddings
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 256,
}


def _build(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "lorafast_export.cli", "build", "--base", str(tmp_path / "base")]
    cmd += ["--adapter", str(tmp_path / "ad"), "--out", str(tmp_path / "out"), "--force", *extra]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    env.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)
    env.pop("TQDM_DISABLE", None)
    return subprocess.run(cmd, capture_output=True, text=True, env=env)


def test_ci_log_lines(tmp_path):
    save_base_and_adapter(tmp_path, {"layers": 1, "rope": LLAMA3_ROPE}, target_modules=["q_proj"])
    write_text(tmp_path / "e.txt", n_chars=400)
    (tmp_path / "p.txt").write_text("the model\n")
    r = _build(tmp_path, "--eval", f"e={tmp_path / 'e.txt'}", "--prompts", str(tmp_path / "p.txt"))
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    stamped = [ln for ln in lines if re.match(r"\[\s*\d+\.\d s\] ", ln)]
    assert stamped and len(stamped) == len(lines), r.stderr  # every line is a stamped progress line
    text = "\n".join(lines)
    for stage in ("load", "merge", "lower", "validate"):
        assert re.search(rf"\] {stage} done \(\d+\.\d s\)", text), stage
    assert "] quantize skipped" in text and "✓" not in text
    assert re.search(r"\] validate: ", text)  # the validate stage's own sub-steps
    assert "Loading weights" not in r.stderr and "original_max_position_embeddings" not in r.stderr


def test_no_library_progress_bars_when_transformers_loads_a_quantized_checkpoint(tmp_path):
    """An asymmetric int4 compressed-tensors checkpoint, validated in transformers: compressed-tensors' tqdm bars
    ("Applying quantization config", "Compressing model", ...) stay out of the log. Lines other than progress
    lines may only be our own warnings (the hf session's, where transformers loads the checkpoint dequantized)."""
    save_base_and_adapter(tmp_path, {"layers": 1}, target_modules=["q_proj"])
    write_text(tmp_path / "e.txt", n_chars=400)
    (tmp_path / "p.txt").write_text("the model\n")
    args = ["--quant", "rtn", "--group-size", "16", "--asymmetric", "--target", "hf", "--hf-format"]
    args += ["compressed-tensors", "--eval", f"e={tmp_path / 'e.txt'}", "--prompts", str(tmp_path / "p.txt")]
    r = _build(tmp_path, *args, "--gate", "kl_mean<=100")  # a random tiny model: only the output is tested
    assert r.returncode == 0, r.stderr
    other = [ln for ln in r.stderr.splitlines() if not re.match(r"\[\s*\d+\.\d s\] ", ln)]
    assert all(ln.startswith("WARNING lorafast_export.") for ln in other), other
    assert "it/s" not in r.stderr and "Compressing model" not in r.stderr
    assert "validate done" in r.stderr
    # a warning names the artifact the user gets, not the build's staging directory (gone when it ends)
    assert ".partial-" not in r.stderr
    if other:  # transformers 5.23+ loads this checkpoint dequantized, and says so
        assert all(f"{tmp_path / 'out' / 'model'}: " in ln for ln in other), other


def test_no_validate_is_shown_as_skipped(tmp_path):
    save_base_and_adapter(tmp_path, {"layers": 1}, target_modules=["q_proj"])
    r = _build(tmp_path, "--no-validate")
    assert r.returncode == 0, r.stderr
    assert "] validate skipped" in r.stderr and "validate done" not in r.stderr
