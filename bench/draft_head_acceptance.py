"""`--speculative int4` on a torch-compile artifact: how the draft's lm_head changes acceptance (never the output).

The artifact is its own int4 draft (decoder linears int4 RTN at load); its lm_head as stored, int8 per output
channel (what `--speculative int4` gives it since session 41: runtime/loader._int8_head) or int4 RTN (option
draft_int4_head). Each prompt of a jsonl file is generated alone, greedy, speculation always; every output is
compared with the model's plain greedy output. Acceptance = accepted / drafted tokens over all prompts.

    python bench/draft_head_acceptance.py --artifact dist/tc-demo [--device cuda] [--new-tokens 128]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lorafast_export.runtime import api, loader  # noqa: E402

PROMPTS = ROOT / "lorafast_export" / "data" / "text" / "prompts.jsonl"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifact", required=True)
    p.add_argument("--prompts", default=str(PROMPTS))
    p.add_argument("--device", default="cpu")
    p.add_argument("--new-tokens", type=int, default=128)
    a = p.parse_args()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(api.model_dir_of(a.artifact))
    prompts = [tok(json.loads(line)["prompt"])["input_ids"] for line in open(a.prompts) if line.strip()]
    plain = api.load(a.artifact, a.device)
    want = [plain.generate_batch([ids], a.new_tokens)[0] for ids in prompts]
    del plain
    rows = []
    keep = loader._int8_head
    for head in ("stored", "int8", "int4"):
        if head == "stored":  # the draft's head as the artifact stores it (before session 41)
            loader._int8_head = lambda cfg, fp, q, model_dir: (fp, q)
        try:
            rt = api.load(a.artifact, a.device, draft=a.artifact, draft_int4=True, speculation="always",
                          draft_int4_head=head == "int4")  # fmt: skip
        finally:
            loader._int8_head = keep
        t0, got = time.perf_counter(), [rt.generate_batch([ids], a.new_tokens)[0] for ids in prompts]
        s = rt.engine.stats
        rows.append({"draft_head": type(rt.engine.draft.dec.lm_head).__name__, "head": head,
                     "acceptance": s.accepted / s.drafted, "drafted": s.drafted, "rounds": s.spec_rounds,
                     "outputs_equal": got == want, "seconds": round(time.perf_counter() - t0, 2)})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    print("\n| draft lm_head | module | acceptance | drafted | rounds | outputs equal to the model alone |")
    print("|---|---|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['head']} | {r['draft_head']} | {100 * r['acceptance']:.1f}% | {r['drafted']} | {r['rounds']} | "
              f"{r['outputs_equal']} |")  # fmt: skip


if __name__ == "__main__":
    main()
