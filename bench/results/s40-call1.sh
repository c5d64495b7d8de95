# Session 40, call 1 (any card). The CUDA tests of the runtimes that run the decode attention (fused decode,
# speculative verify rows against single steps); then 8B decode at batch $BATCH (default 1,32), bf16 and int4 g128
# + int8 head, with attention.decode_plan (new; session 39's fitted plan) and sessions 9-38's plan (old;
# bench/results/s39_plan.py), one process each; then, if 200 s remain, issue 15's table with the new plan
# (s40-table.sh: copy, bf16, int4h8, profile, mixed, e2e), then one more old run if time remains. Pass LIMIT=.
source bench/results/device_env.sh || exit 3
LIMIT=${LIMIT:-590}
BATCH=${BATCH:-1,32}
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 130 python3 -m pytest -q -p no:cacheprovider tests/runtime/test_triton_fused.py tests/runtime/test_triton_attention.py -k "runtime_with_fused or speculative_runtime or verify_rows or decode or blocks or gpu" > $OUT/cuda_tests.txt 2>&1
echo "tests rc $? at ${SECONDS}s"; tail -2 $OUT/cuda_tests.txt
ab() {
  if [ $1 = new ]; then B=bench/torch_bench.py; else B=bench/results/s39_plan.py; fi
  timeout $((LIMIT - 10 - SECONDS)) python3 $B --device cuda --shape llama3-8b --sections bf16,int4h8 --batch $BATCH --single-step-peer 0 --new-tokens 128 --out $OUT/$1_$2.json > $OUT/$1_$2.log 2>&1
  echo "$1 rc $? at ${SECONDS}s"; python3 bench/results/table_summary.py $OUT/$1_$2.json 2>&1 | grep -E "^(bf16|int4)"
}
ab new 1
ab old 2
if [ $((LIMIT - SECONDS)) -ge 200 ]; then
  LIMIT=$((LIMIT - SECONDS)) bash bench/results/s40-table.sh 2>&1 | grep -v "^main "
  (cd $OUT && tar xzf call.tgz && rm call.tgz)
fi
[ $((LIMIT - SECONDS)) -ge 80 ] && ab old 3
[ $((LIMIT - SECONDS)) -ge 80 ] && ab new 4
(cd $OUT && tar czf /tmp/call.tgz . && rm -rf ./* && mv /tmp/call.tgz .)
