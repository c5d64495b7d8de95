# Session 27 call 3: why the trained 8B-wide speculative rows ran at 0.86-0.88x (call C, bench/TORCH.md session 27):
# specwide again (bf16 head draft, k = 2 and 4 always, 128 new tokens, median of 3), each `always` row then
# profiled over 8 rounds (--spec-profile on): wall ms and tokens a round, the GPU's kernel time a round and its
# top kernels, so the round's time splits into GPU work and GPU idle.
source bench/results/device_env.sh || exit 3
timeout 400 python3 bench/torch_bench.py --device cuda --shape llama3-8b --sections specwide --spec-k 2,4 --new-tokens 128 --spec-repeats 3 --spec-profile on --out $OUT/specprof.json > $OUT/specprof.log 2>&1
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
(cd $OUT && tar czf /tmp/call3.tgz . && rm -rf ./* && mv /tmp/call3.tgz .)
