# Session 39, call 1 (any card). The CUDA tests of the decode attention (cache blocks an iteration, one split
# written by the decode kernel) and of the runtimes that run it (fused decode, speculative verify rows, PDL chains);
# the attention plan sweep at the 8B shape (torch_bench --sections attnplan); then 8B decode at batch 1, bf16 and
# int4 g128 + int8 head, with attention.decode_plan (new), sessions 9-38's plan (old) and num_splits' count with
# several blocks a split at every width (splits; bench/results/s39_plan.py), one process each, alternated.
# Pass LIMIT=.
source bench/results/device_env.sh || exit 3
LIMIT=${LIMIT:-590}
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/runtime/test_triton_attention.py tests/runtime/test_triton_fused.py -k "decode or blocks or split or merge or runtime_with_fused or speculative_runtime or verify_rows or programmatic" > $OUT/cuda_tests.txt 2>&1
echo "tests rc $? at ${SECONDS}s"; tail -2 $OUT/cuda_tests.txt
timeout 170 python3 bench/torch_bench.py --device cuda --shape llama3-8b --sections attnplan --out $OUT/attnplan.json > $OUT/attnplan.log 2>&1
echo "attnplan rc $? at ${SECONDS}s"; grep "attnplan b" $OUT/attnplan.log
for v in old new splits new old; do
  [ $((LIMIT - SECONDS)) -lt 75 ] && break
  if [ $v = new ]; then B=bench/torch_bench.py; else B=bench/results/s39_plan.py; fi
  PLAN=$v timeout $((LIMIT - 10 - SECONDS)) python3 $B --device cuda --shape llama3-8b --sections bf16,int4h8 --batch 1 --single-step-peer 0 --new-tokens 128 --out $OUT/$v.json > $OUT/$v.log 2>&1
  echo "$v rc $? at ${SECONDS}s"; python3 bench/results/table_summary.py $OUT/$v.json 2>&1 | grep -E "^(bf16|int4)"
done
(cd $OUT && tar czf /tmp/call.tgz . && rm -rf ./* && mv /tmp/call.tgz .)
