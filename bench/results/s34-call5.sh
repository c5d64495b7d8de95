# Session 34, call 5: (1) the W8A8 CUDA tests after the layer test's rewrite; (2) the headline build on the trained
# demo widened to llama3-8b (trt-llm + awq, default validation, cold caches: issue 13's 8B lines on this main);
# (3) the torch-compile + gptq build; (4) if time is left, torch-compile + smoothquant (the validate stage's
# artifact runs the W8A8 runtime on the GPU). Pass LIMIT=.
source bench/results/device_env.sh || exit 3
LIMIT=${LIMIT:-590}
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 100 python3 -m pytest -q -p no:cacheprovider tests/runtime/test_triton_w8a8.py tests/runtime/test_linear.py -k "w8a8 or tiles" > $OUT/cuda_tests.txt 2>&1
echo "w8a8 CUDA tests rc $? at ${SECONDS}s"; tail -2 $OUT/cuda_tests.txt
D=lorafast_export/data/demo
python3 scripts/make_model.py widen /tmp/w8b --base $D/base --adapter $D/lora --preset llama3-8b --dtype bfloat16 --device cuda > $OUT/widen.log 2>&1
echo "widen rc $? at ${SECONDS}s"; tail -1 $OUT/widen.log
n=0
for qt in "awq trt-llm" "gptq torch-compile" "smoothquant torch-compile"; do
  set -- $qt; n=$((n + 1))
  left=$((LIMIT - 10 - SECONDS)); [ $left -lt 120 ] && { echo "skip $1 $2: ${left}s left"; continue; }
  timeout $left python3 bench/validate_scale.py build --base /tmp/w8b/base --adapter /tmp/w8b/lora --quant $1 --target $2 --logs $OUT/b$n --json-out $OUT/rows$n.jsonl > $OUT/build$n.log 2>&1
  echo "$2 $1 rc $? at ${SECONDS}s"; tail -1 $OUT/build$n.log
  python3 -c "import json,sys; d=json.loads(open(sys.argv[1]).readline()); print({k: d.get(k) for k in ('exit','timings_s','peak_rss_gb','peak_gpu_gb','kl_mean','greedy_match','wall_s')})" $OUT/rows$n.jsonl 2>&1 | cut -c1-600
done
(cd $OUT && tar czf /tmp/call.tgz . && rm -rf ./* && mv /tmp/call.tgz .)
