# Session 36, call 3 (the device time left, ~250 s): the trained demo widened to llama3-8b, then
# `build --target torch-compile --quant rtn` with default validation, cold caches: the lowering's peak host RSS
# after the int8 head's write was made to stream (call 2's gptq build peaked at 15.75 GB). Pass LIMIT=.
source bench/results/device_env.sh || exit 3
LIMIT=${LIMIT:-200}
D=lorafast_export/data/demo
python3 scripts/make_model.py widen /tmp/w8b --base $D/base --adapter $D/lora --preset llama3-8b --dtype bfloat16 --device cuda > $OUT/widen.log 2>&1
echo "widen rc $? at ${SECONDS}s"; tail -1 $OUT/widen.log
timeout $((LIMIT - 5 - SECONDS)) python3 bench/validate_scale.py build --base /tmp/w8b/base --adapter /tmp/w8b/lora --quant rtn --target torch-compile --logs $OUT/b1 --json-out $OUT/rows1.jsonl > $OUT/build1.log 2>&1
echo "torch-compile rtn rc $? at ${SECONDS}s"; tail -1 $OUT/build1.log
python3 -c "import json,sys; d=json.loads(open(sys.argv[1]).readline()); print({k: d.get(k) for k in ('exit','timings_s','peak_rss_gb','peak_gpu_gb','kl_mean','vs_previous_kl','wall_s')})" $OUT/rows1.jsonl 2>&1 | cut -c1-1200
(cd $OUT && tar czf /tmp/call.tgz . && rm -rf ./* && mv /tmp/call.tgz .)
