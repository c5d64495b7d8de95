# Session 28 call 1. (1) The headline build on the trained demo widened to llama3-8b, after the AWQ fix of session 27
# (7039b9c), default validation, cold caches: issue 13's H200 lines with gates that mean something. (2) The fused
# decode kernels taking 2 or 4 rows a program (runtime/triton_fused.py, rows_per_program): their CUDA tests (row i
# of an M-row call bit-equal to the 1-row call, at the 8B shapes and shipped tiles too), the ops timed at 1-8 rows
# one row a program against 2 and 4 (section fusedrows). (3) specwide (the 8B-wide trained demo, int4 g128 draft,
# k = 2 and 4) with each `always` row profiled over 8 rounds and repeated with one verify row a program (the old
# launch): what the verify's rows cost. Pass LIMIT= the seconds this call may run.
source bench/results/device_env.sh || exit 3
LIMIT=${LIMIT:-590}
D=lorafast_export/data/demo
python3 scripts/make_model.py widen /tmp/w8b --base $D/base --adapter $D/lora --preset llama3-8b --dtype bfloat16 --device cuda > $OUT/widen.log 2>&1
echo "widen rc $? at ${SECONDS}s"; tail -1 $OUT/widen.log
timeout 270 python3 bench/validate_scale.py build --base /tmp/w8b/base --adapter /tmp/w8b/lora --quant awq --target trt-llm --logs $OUT --json-out $OUT/rows.jsonl > $OUT/trtllm-bench.log 2>&1
echo "trt-llm awq rc $? at ${SECONDS}s"; tail -1 $OUT/trtllm-bench.log
python3 -c "import json,sys; d=json.loads(open(sys.argv[1]).readline()); print(d['exit'], d['timings_s'], d['kl_mean'], d['greedy_match'])" $OUT/rows.jsonl
rm -rf /tmp/w8b
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/runtime/test_triton_fused.py > $OUT/cuda_tests_fused.txt 2>&1
echo "fused CUDA tests rc $? at ${SECONDS}s"; tail -3 $OUT/cuda_tests_fused.txt
timeout 120 python3 bench/torch_bench.py --device cuda --shape llama3-8b --sections fusedrows --out $OUT/fusedrows.json > $OUT/fusedrows.log 2>&1
echo "fusedrows rc $? at ${SECONDS}s"
python3 - $OUT/fusedrows.json <<'PY'
import json, sys
for r in json.load(open(sys.argv[1]))["fusedrows"]["ops"]:
    us = "  ".join(f"rg{g} {r[f'us_rg{g}']:7.1f} ({r[f'rows_equal_rg{g}']}/{r['rows']})" for g in (1, 2, 4) if f"us_rg{g}" in r)
    print(f"{r['op']:8} rows {r['rows']} default rg{r['default_rg']}  {us}")
PY
[ $((LIMIT - SECONDS)) -gt 90 ] && timeout $((LIMIT - 10 - SECONDS)) python3 bench/torch_bench.py --device cuda --shape llama3-8b --sections specwide --spec-k 2,4 --new-tokens 128 --spec-repeats 1 --spec-profile on --spec-rows-ab on --out $OUT/specprof.json > $OUT/specprof.log 2>&1
echo "specwide + profile rc $? at ${SECONDS}s"; grep -E "profile:|specwide k|alone:" $OUT/specprof.log | cut -c1-260
python3 - $OUT/specprof.json <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))["specwide"]
for k, v in d.items():
    p = isinstance(v, dict) and v.get("profile")
    if p:
        print(k, {x: p[x] for x in ("wall_ms_per_round", "tokens_per_round", "gpu_us_per_step", "gpu_idle_ms_per_round", "kernels_per_step", "groups_us")})
        for r in p["top"][:16]:
            print("   %8.1f us %5.1f x  %s" % (r["us_per_step"], r["calls_per_step"], r["kernel"]))
PY
(cd $OUT && tar czf /tmp/call.tgz . && rm -rf ./* && mv /tmp/call.tgz .)
