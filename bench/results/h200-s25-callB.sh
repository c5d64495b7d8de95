# Session 25 call B (not run in session 25: no device was lent; for after call A, if `fused_pdl` gained there):
# issue 15's whole table in one process with the runtime option fused_pdl on, as session 24's call C ran it
# (copy, bf16 and int4 at batch 1 and 32, the mixed workload's first pass, end to end against transformers' static
# cache + compile, 5 pairs, the 8B and the trained demo's speculative rows), after the device-guard and warm-up
# CUDA tests; then a per-kernel profile of one decode step at batch 1, bf16 and int4, with the option on.
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl 2>/dev/null && export PYTHONPATH=/tmp/site:$PWD || exit 3
echo "main $(cat .devq/commit)"
timeout 120 python3 -m pytest -q -rs -p no:cacheprovider tests/runtime/test_device_guard.py tests/runtime/test_warm_up_cuda.py > $OUT/cuda_tests.txt 2>&1
echo "cuda tests rc $? at ${SECONDS}s" | tee -a $OUT/cuda_tests.txt; grep -E "passed|failed|SKIP|Error" $OUT/cuda_tests.txt | tail -4
timeout $((500 - SECONDS)) python3 bench/torch_bench.py --device cuda --shape llama3-8b --sections copy,bf16,int4,mixed,e2e,spec,specdemo --batch 1,32 --single-step-peer 0 --mixed-peer none --mixed-policies default --e2e-repeats 5 --fused-pdl on --out $OUT/table.json > $OUT/table.log 2>&1
echo "table rc $? at ${SECONDS}s"; grep -E "^\[|mixed (first|default)" $OUT/table.log | cut -c1-160
python3 - "$OUT/table.json" <<'PY' 2>&1 | tail -20
import json, sys
d = json.load(open(sys.argv[1]))
for k in ("bf16", "int4"):
    for r in d.get(k, {}).get("results", []):
        print(k, r["batch"], round(r["decode_tokens_per_s"], 1), round(r["decode_step_ms"], 3), "ttft med", r["ttft_ms_median"])
m = d.get("mixed", {}).get("policies", {})
for p in ("first_pass", "default"):
    if p in m: print("mixed", p, "ttft median", round(m[p]["ttft_ms_median"], 1))
e = d.get("e2e", {})
print("e2e", e.get("ours_median"), e.get("peer_median"), e.get("speedup_median"), e.get("speedup_pairs"))
for s in ("spec", "specdemo"):
    for k, v in d.get(s, {}).items():
        if isinstance(v, dict) and "spec_acceptance" in v:
            print(s, k, v.get("speculation"), "acc", v.get("acceptance", v.get("acceptance_all_prompts")), "x", v.get("speedup_decode_vs_bf16", v.get("speedup_decode_vs_alone")), "equal", v.get("tokens_equal_bf16_alone", v.get("tokens_equal_alone")))
PY
timeout $((590 - SECONDS)) python3 bench/torch_bench.py --device cuda --shape llama3-8b --sections profile --profile bf16,int4 --batch 1 --fused-pdl on --out $OUT/profile.json > $OUT/profile.log 2>&1
echo "profile rc $? at ${SECONDS}s"; grep -E "^\[" $OUT/profile.log | cut -c1-300
