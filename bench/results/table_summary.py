"""Print issue 15's table lines from a torch_bench --out JSON (the bf16 / int4 rows, the mixed workload's TTFT,
end to end, the speculative rows): `python3 bench/results/table_summary.py table.json`."""

import json
import sys

d = json.load(open(sys.argv[1]))
for k in ("bf16", "int4", "int4h8"):
    for r in d.get(k, {}).get("results", []):
        print(
            k,
            r["batch"],
            round(r["decode_tokens_per_s"], 1),
            round(r["decode_step_ms"], 3),
            "ttft med",
            r["ttft_ms_median"],
        )
m = d.get("mixed", {}).get("policies", {})
for p in ("first_pass", "default"):
    if p in m:
        print("mixed", p, "ttft median", round(m[p]["ttft_ms_median"], 1))
e = d.get("e2e", {})
print("e2e", e.get("ours_median"), e.get("peer_median"), e.get("speedup_median"), e.get("speedup_pairs"))
for s in ("spec", "specdemo"):
    for k, v in d.get(s, {}).items():
        if isinstance(v, dict) and "spec_acceptance" in v:
            print(
                s,
                k,
                v.get("speculation"),
                "acc",
                v.get("acceptance", v.get("acceptance_all_prompts")),
                "x",
                v.get("speedup_decode_vs_bf16", v.get("speedup_decode_vs_alone")),
                "equal",
                v.get("tokens_equal_bf16_alone", v.get("tokens_equal_alone")),
            )
