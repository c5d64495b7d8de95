# Session 39, call 1. The CUDA tests of the decode attention (cache blocks an iteration, one split written by the
# decode kernel), the attention plan sweep at the 8B shape (torch_bench --sections attnplan), then the trained demo
# widened to llama3-8b and the headline build (`--target trt-llm --quant awq`, default validation, cold caches).
# The build on an H200 only (an H100 ran it in session 37). Pass LIMIT=.
source bench/results/device_env.sh || exit 3
LIMIT=${LIMIT:-590}
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/runtime/test_triton_attention.py > $OUT/cuda_tests.txt 2>&1
echo "tests rc $? at ${SECONDS}s"; tail -2 $OUT/cuda_tests.txt
timeout 200 python3 bench/torch_bench.py --device cuda --shape llama3-8b --sections attnplan --out $OUT/attnplan.json > $OUT/attnplan.log 2>&1
echo "attnplan rc $? at ${SECONDS}s"; grep "attnplan b" $OUT/attnplan.log
[[ "$(nvidia-smi --query-gpu=name --format=csv,noheader)" == *H200* ]] || { (cd $OUT && tar czf /tmp/call.tgz . && rm -rf ./* && mv /tmp/call.tgz .); exit 0; }
D=lorafast_export/data/demo
python3 scripts/make_model.py widen /tmp/w8b --base $D/base --adapter $D/lora --preset llama3-8b --dtype bfloat16 --device cuda > $OUT/widen.log 2>&1
echo "widen rc $? at ${SECONDS}s"; tail -1 $OUT/widen.log
timeout $((LIMIT - 10 - SECONDS)) python3 bench/validate_scale.py build --base /tmp/w8b/base --adapter /tmp/w8b/lora --quant awq --target trt-llm --logs $OUT/b1 --json-out $OUT/rows1.jsonl > $OUT/build1.log 2>&1
echo "trt-llm awq rc $? at ${SECONDS}s"; tail -1 $OUT/build1.log
python3 -c "import json,sys; d=json.loads(open(sys.argv[1]).readline()); print({k: d.get(k) for k in ('exit','timings_s','peak_rss_gb','peak_gpu_gb','kl_mean','vs_previous_kl','greedy_match','wall_s')})" $OUT/rows1.jsonl 2>&1 | cut -c1-1500
(cd $OUT && tar czf /tmp/call.tgz . && rm -rf ./* && mv /tmp/call.tgz .)
