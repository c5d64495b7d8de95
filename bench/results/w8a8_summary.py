"""Print a torch_bench run's SmoothQuant results (sections w8a8check, w8a8k, bf16, w8a8): python w8a8_summary.py RUN.json"""

import json
import sys

d = json.load(open(sys.argv[1]))
if "w8a8check" in d:
    print("w8a8check", json.dumps(d["w8a8check"]))
for r in d.get("w8a8k", {}).get("vs_dense", []):
    print(
        f"w8a8k {r['linear']:8s} rows {r['rows']:4d} {r['kind']:20s} {r['us']:9.2f} us  dense {r['dense_us']:9.2f} us  {r['speedup']:.2f}x"
    )
runs = {
    k: {r["batch"]: r["decode_tokens_per_s"] for r in d[k]["results"]}
    for k in ("bf16", "w8a8")
    if isinstance(d.get(k), dict) and "results" in d[k]
}
if "copy" in d:
    print("copy", d["copy"].get("TBps"), "TB/s")
for b in sorted(set().union(*[set(v) for v in runs.values()]) if runs else []):
    bf, w8 = runs.get("bf16", {}).get(b), runs.get("w8a8", {}).get(b)
    ratio = f"{w8 / bf:.2f}x" if bf and w8 else "-"
    print(f"decode batch {b}: bf16 {bf} tok/s, w8a8 {w8} tok/s, {ratio}")
for k in ("bf16", "w8a8"):
    if isinstance(d.get(k), dict):
        print(k, "kernels", d[k].get("kernels"), "weight bytes a step", d[k].get("weight_bytes_per_step"))
