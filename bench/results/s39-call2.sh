# Session 39, call 2 (any card; it never got a machine). The CUDA tests of the runtimes that run the decode attention (fused decode,
# speculative verify rows against single steps), then 8B decode at batch $BATCH (default 1), bf16 and int4 g128 + int8 head,
# with attention.decode_plan as fitted to call 1's sweep (new) and with sessions 9-38's plan (old;
# bench/results/s39_plan.py), one process each, alternated. Pass LIMIT= and BATCH= (1, 32, or 1,32).
source bench/results/device_env.sh || exit 3
LIMIT=${LIMIT:-590}
BATCH=${BATCH:-1}
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 100 python3 -m pytest -q -p no:cacheprovider tests/runtime/test_triton_fused.py -k "runtime_with_fused or speculative_runtime or verify_rows" > $OUT/cuda_tests.txt 2>&1
echo "tests rc $? at ${SECONDS}s"; tail -2 $OUT/cuda_tests.txt
for v in new old new old; do
  [ $((LIMIT - SECONDS)) -lt 80 ] && break
  if [ $v = new ]; then B=bench/torch_bench.py; else B=bench/results/s39_plan.py; fi
  timeout $((LIMIT - 10 - SECONDS)) python3 $B --device cuda --shape llama3-8b --sections bf16,int4h8 --batch $BATCH --single-step-peer 0 --new-tokens 128 --out $OUT/$v.json > $OUT/$v.log 2>&1
  echo "$v rc $? at ${SECONDS}s"; python3 bench/results/table_summary.py $OUT/$v.json 2>&1 | grep -E "^(bf16|int4)"
  cp $OUT/$v.log $OUT/${v}_$SECONDS.log
done
(cd $OUT && tar czf /tmp/call.tgz . && rm -rf ./* && mv /tmp/call.tgz .)
