# Session 36, call 2: the trained demo widened to llama3-8b, then with default validation and cold caches
# (1) `--target torch-compile --quant gptq`, whose artifact now stores the lm_head int8 (target option lm_head
# auto; the validate stage's artifact runs our runtime on the GPU with it: its vs_previous KL is the head's and
# the runtime's cost); (2) the headline `--target trt-llm --quant awq` on this main. Pass LIMIT=.
source bench/results/device_env.sh || exit 3
LIMIT=${LIMIT:-590}
nvidia-smi --query-gpu=name --format=csv,noheader
D=lorafast_export/data/demo
python3 scripts/make_model.py widen /tmp/w8b --base $D/base --adapter $D/lora --preset llama3-8b --dtype bfloat16 --device cuda > $OUT/widen.log 2>&1
echo "widen rc $? at ${SECONDS}s"; tail -1 $OUT/widen.log
n=0
for qt in "gptq torch-compile" "awq trt-llm"; do
  set -- $qt; n=$((n + 1))
  left=$((LIMIT - 10 - SECONDS)); [ $left -lt 120 ] && { echo "skip $1 $2: ${left}s left"; continue; }
  timeout $left python3 bench/validate_scale.py build --base /tmp/w8b/base --adapter /tmp/w8b/lora --quant $1 --target $2 --logs $OUT/b$n --json-out $OUT/rows$n.jsonl > $OUT/build$n.log 2>&1
  echo "$2 $1 rc $? at ${SECONDS}s"; tail -1 $OUT/build$n.log
  python3 -c "import json,sys; d=json.loads(open(sys.argv[1]).readline()); print({k: d.get(k) for k in ('exit','timings_s','peak_rss_gb','peak_gpu_gb','kl_mean','vs_previous_kl','greedy_match','wall_s')})" $OUT/rows$n.jsonl 2>&1 | cut -c1-1500
done
(cd $OUT && tar czf /tmp/call.tgz . && rm -rf ./* && mv /tmp/call.tgz .)
