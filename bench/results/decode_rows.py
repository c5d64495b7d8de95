"""One line per torch_bench.py JSON: its bf16 and int4 decode rows (batch, tok/s, ms a step). The device scripts'
summary (bench/results/h200-s*-call*.sh)."""

import json
import sys

for path in sys.argv[1:]:
    try:
        d = json.load(open(path))
    except (OSError, ValueError) as e:
        print(path.rsplit("/", 1)[-1], f"unreadable: {e}")
        continue
    out = []
    for k in ("bf16", "int4"):
        for r in d.get(k, {}).get("results", []):
            out.append(
                f"{k} b{r['batch']} {r['decode_tokens_per_s']:.1f} tok/s ({r['decode_step_ms']:.3f} ms)"
            )
    print(path.rsplit("/", 1)[-1], "; ".join(out))
