"""Print a torch_bench run's quantized results (sections w8a8check, w8a8k, bf16, w8a8, int8, int4 and their int8-head forms int4h8, int8h8, w8a8h8): decode tok/s and the
median time to first token of each quantized model against bf16's. python w8a8_summary.py RUN.json"""

import json
import sys

d = json.load(open(sys.argv[1]))
if "w8a8check" in d:
    print("w8a8check", json.dumps(d["w8a8check"]))
for r in d.get("w8a8k", {}).get("vs_dense", []):
    print(
        f"w8a8k {r['linear']:8s} rows {r['rows']:4d} {r['kind']:20s} {r['us']:9.2f} us  dense {r['dense_us']:9.2f} us  {r['speedup']:.2f}x"
    )
QUANT = ("w8a8", "int8", "int4", "int4h8", "int8h8", "w8a8h8")
runs = {
    k: {r["batch"]: r for r in d[k]["results"]}
    for k in ("bf16", *QUANT)
    if isinstance(d.get(k), dict) and "results" in d[k]
}
if "copy" in d:
    print("copy", d["copy"].get("TBps"), "TB/s")
for q in (k for k in QUANT if k in runs):
    for b, r in sorted(runs[q].items()):
        bf = runs.get("bf16", {}).get(b)
        tok, ttft = r["decode_tokens_per_s"], r["ttft_ms_median"]
        vs = f"{tok / bf['decode_tokens_per_s']:.2f}x, ttft bf16 {bf['ttft_ms_median']:.1f} ms" if bf else "-"
        print(f"{q} batch {b}: decode {tok:.1f} tok/s, ttft {ttft:.1f} ms; vs bf16 {vs}")
for k in runs:
    print(k, "kernels", d[k].get("kernels"), "weight bytes a step", d[k].get("weight_bytes_per_step"))
