# Session 37, call 1. The trained demo widened to llama3-8b, then, with default validation and cold caches, one
# after the other: the headline `build --target trt-llm --quant awq`, and `build --target torch-compile --quant gptq`
# (its artifact's head int8; session 36's call 2 peaked at 15.75 GB host RSS before the streamed head write).
# Pass LIMIT=.
source bench/results/device_env.sh || exit 3
LIMIT=${LIMIT:-590}
nvidia-smi --query-gpu=name --format=csv,noheader
D=lorafast_export/data/demo
python3 scripts/make_model.py widen /tmp/w8b --base $D/base --adapter $D/lora --preset llama3-8b --dtype bfloat16 --device cuda > $OUT/widen.log 2>&1
echo "widen rc $? at ${SECONDS}s"; tail -1 $OUT/widen.log
i=0
for spec in "awq trt-llm" "gptq torch-compile"; do
  set -- $spec; i=$((i + 1))
  timeout $((LIMIT - 10 - SECONDS)) python3 bench/validate_scale.py build --base /tmp/w8b/base --adapter /tmp/w8b/lora --quant $1 --target $2 --logs $OUT/b$i --json-out $OUT/rows$i.jsonl > $OUT/build$i.log 2>&1
  echo "$2 $1 rc $? at ${SECONDS}s"; tail -1 $OUT/build$i.log
  python3 -c "import json,sys; d=json.loads(open(sys.argv[1]).readline()); print({k: d.get(k) for k in ('exit','timings_s','peak_rss_gb','peak_gpu_gb','kl_mean','vs_previous_kl','greedy_match','wall_s')})" $OUT/rows$i.jsonl 2>&1 | cut -c1-1500
done
(cd $OUT && tar czf /tmp/call.tgz . && rm -rf ./* && mv /tmp/call.tgz .)
