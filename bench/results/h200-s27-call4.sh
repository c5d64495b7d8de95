# Session 27 call 4: the headline build again on the trained demo widened to llama3-8b, after the AWQ fix (dead
# channels kept at s = 1 and out of the scale's normalisation: lorafast_export/quant/awq.py), with default validation
# from cold caches; then why the 8B-wide speculative rows ran at 0.86-0.88x in call C: specwide (bf16-head draft,
# k = 2 and 4 always, 128 new tokens, one timed run each), each `always` row profiled over 8 rounds (--spec-profile on).
source bench/results/device_env.sh || exit 3
LIMIT=${LIMIT:-590}  # the seconds this call may run (the session's device time left)
D=lorafast_export/data/demo
python3 scripts/make_model.py widen /tmp/w8b --base $D/base --adapter $D/lora --preset llama3-8b --dtype bfloat16 --device cuda > $OUT/widen.log 2>&1
echo "widen rc $? at ${SECONDS}s"; tail -1 $OUT/widen.log
timeout 270 python3 bench/validate_scale.py build --base /tmp/w8b/base --adapter /tmp/w8b/lora --quant awq --target trt-llm --logs $OUT --json-out $OUT/rows.jsonl > $OUT/trtllm-bench.log 2>&1
echo "trt-llm awq rc $? at ${SECONDS}s"; tail -1 $OUT/trtllm-bench.log
python3 -c "import json,sys; d=json.loads(open(sys.argv[1]).readline()); print(d['exit'], d['timings_s'], d['kl_mean'], d['greedy_match'])" $OUT/rows.jsonl
rm -rf /tmp/w8b
[ $((LIMIT - SECONDS)) -gt 60 ] && timeout $((LIMIT - 10 - SECONDS)) python3 bench/torch_bench.py --device cuda --shape llama3-8b --sections specwide --spec-k 2,4 --new-tokens 128 --spec-repeats 1 --spec-profile on --out $OUT/specprof.json > $OUT/specprof.log 2>&1
echo "specwide + profile rc $? at ${SECONDS}s"; grep -E "profile:|specwide k|alone:" $OUT/specprof.log | cut -c1-220
python3 - $OUT/specprof.json <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))["specwide"]
for k, v in d.items():
    p = isinstance(v, dict) and v.get("profile")
    if p:
        print(k, {x: p[x] for x in ("wall_ms_per_round", "tokens_per_round", "gpu_us_per_step", "gpu_idle_ms_per_round", "kernels_per_step", "groups_us")})
        for r in p["top"][:25]:
            print("   %8.1f us %5.1f x  %s" % (r["us_per_step"], r["calls_per_step"], r["kernel"]))
PY
(cd $OUT && tar czf /tmp/call4.tgz . && rm -rf ./* && mv /tmp/call4.tgz .)
