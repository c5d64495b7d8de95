# Session 40, call 2 (any card; a short budget): 8B bf16 decode at batch 32, where the fitted plan's attention
# gained most in session 39's sweep, with attention.decode_plan (new) and sessions 9-38's plan (old;
# bench/results/s39_plan.py), one process each, then the CUDA tests of the runtimes that run the attention with the
# time left. Pass LIMIT=.
source bench/results/device_env.sh || exit 3
LIMIT=${LIMIT:-200}
nvidia-smi --query-gpu=name --format=csv,noheader
for v in new old; do
  if [ $v = new ]; then B=bench/torch_bench.py; else B=bench/results/s39_plan.py; fi
  timeout $((LIMIT / 3)) python3 $B --device cuda --shape llama3-8b --sections bf16 --batch 32 --single-step-peer 0 --new-tokens 128 --out $OUT/$v.json > $OUT/$v.log 2>&1
  echo "$v rc $? at ${SECONDS}s"; python3 bench/results/table_summary.py $OUT/$v.json 2>&1 | grep -E "^bf16"
done
timeout $((LIMIT - 5 - SECONDS)) python3 -m pytest -q -p no:cacheprovider tests/runtime/test_triton_fused.py -k "speculative_runtime or verify_rows" > $OUT/cuda_tests.txt 2>&1
echo "tests rc $? at ${SECONDS}s"; tail -2 $OUT/cuda_tests.txt
