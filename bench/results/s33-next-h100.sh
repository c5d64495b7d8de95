# Written in session 33 for the next session with an H100 (one call, ~400 s of running; a start costs ~150-180 s more):
# (1) the chunked default after session 33's two fixes (the last chunk's step decodes one step, not a burst; one
#     warm graph instead of two): bench/results/s33_warm.py with prefill_chunk 2048 and 0, cold inductor caches
#     (session 33 call 5: load 46.8 against 22.4 s, the step 140 against 75 ms; first_token_ms is new);
# (2) tune-kernels with the head (the H100 table has no [128256, 4096] entry, so a quantized head runs the GEMM_W
#     rule), rows 1, 2, 4, 8, then int4 with the head quantized against bf16 at batch 1 on that cache
#     (session 33: 2.56-2.59x on the rule). Pass LIMIT=.
source bench/results/device_env.sh || exit 3
nvidia-smi --query-gpu=name --format=csv,noheader
for c in 2048 0; do
TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) timeout 110 python3 bench/results/s33_warm.py $c > $OUT/warm$c.log 2>&1
echo "prefill_chunk $c rc $? at ${SECONDS}s"; grep '^{' $OUT/warm$c.log; grep -iE "error|Traceback" $OUT/warm$c.log | head -3
done
export LORAFAST_CACHE=/tmp/lfc33
mkdir -p /tmp/cfg8b && python3 -c "import json,sys; sys.path.insert(0,'.'); from scripts.make_model import hf_config, shape_of; json.dump(hf_config(shape_of('llama3-8b')), open('/tmp/cfg8b/config.json','w'))"
timeout 120 python3 -m lorafast_export.cli --json tune-kernels --model /tmp/cfg8b --with-head --rows 1,2,4,8 --budget-s 90 > $OUT/tune.json 2> $OUT/tune.log
echo "tune-kernels rc $? at ${SECONDS}s"; tr -d '\n' < $OUT/tune.json | cut -c1-400; echo; cp $LORAFAST_CACHE/kernels/*.json $OUT/ 2>/dev/null
timeout $((${LIMIT:-590} - 10 - SECONDS)) python3 bench/torch_bench.py --device cuda --shape llama3-8b --sections bf16,int4 --batch 1 --quant-lm-head --single-step-peer 0 --new-tokens 128 --out $OUT/head.json > $OUT/head.log 2>&1
echo "quantized head (tuned) rc $? at ${SECONDS}s"; python3 bench/results/table_summary.py $OUT/head.json 2>&1 | tail -4
(cd $OUT && tar czf /tmp/call.tgz . && rm -rf ./* && mv /tmp/call.tgz .)
