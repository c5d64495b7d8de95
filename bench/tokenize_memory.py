"""Peak memory of tokenizing one long single-line text file, whole (as before) vs in bounded pieces (now).

    python bench/tokenize_memory.py [--mb 30] [--out bench/TOKENIZE.md]

Each way runs in a fresh process with the demo base's tokenizer (byte-level BPE) on the same file: the bundled
prose and code text joined into one line and repeated to --mb megabytes. Printed: the process's peak RSS
(ru_maxrss) after reading the text, and at the end, and the token count (both ways must agree).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
import transformers
from lorafast_export.paths import DEMO_DIR
from lorafast_export.textdata import read_texts, token_stream
from pathlib import Path

way, path = sys.argv[1], Path(sys.argv[2])
tok = transformers.AutoTokenizer.from_pretrained(DEMO_DIR / "base")
texts = read_texts(path, "calibration")
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
if way == "whole":  # what quant/calib.py and validate/data.py did before: one tokenizer call per document
    n = sum(len(tok(t, verbose=False)["input_ids"]) for t in texts)
else:
    n = len(token_stream(tok, texts))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"way": way, "tokens": n, "rss_after_read_mb": before / 1024, "peak_rss_mb": peak / 1024,
                  "seconds": time.perf_counter() - t0}))
"""


def one_line_file(path: Path, mb: int) -> Path:
    root = Path(__file__).resolve().parents[1] / "lorafast_export" / "data" / "text"
    text = " ".join((root / f).read_text() for f in ("prose_eval.txt", "code_eval.txt")).replace("\n", " ")
    n = mb * 1_000_000
    path.write_text((text * (n // len(text) + 1))[:n])
    return path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=30)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        f = one_line_file(Path(d) / "line.txt", args.mb)
        for way in ("whole", "pieces"):
            r = subprocess.run([sys.executable, "-c", CHILD, way, str(f)], capture_output=True, text=True)
            if r.returncode:
                raise SystemExit(r.stderr[-3000:])
            rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
    lines = [
        f"One {args.mb} MB single-line text file, demo tokenizer (byte-level BPE), each way in a fresh process.",
        "",
        "| way | tokens | RSS after reading the text (MB) | peak RSS (MB) | seconds |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['way']} | {r['tokens']:,} | {r['rss_after_read_mb']:.0f} | {r['peak_rss_mb']:.0f} | "
            f"{r['seconds']:.1f} |"
        )
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        args.out.write_text(table)


if __name__ == "__main__":
    main()
