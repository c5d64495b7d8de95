# Session 14 lead call D: the two 8B builds with default validation, cold caches, after fused_decode became `auto`
# (the torch-compile artifact's greedy check decodes in our runtime, now through the fused kernels): the headline
# (trt-llm + awq) and torch-compile + gptq.
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 3
echo "main $(cat .devq/commit)"
python3 scripts/make_model.py both /tmp/m8b --preset llama3-8b --dtype bfloat16 --device cuda > /tmp/make_model.log 2>&1; echo "make_model rc $? at ${SECONDS}s"
echo "[$SECONDS s] trt-llm awq (the headline)"
timeout $((300 - SECONDS)) python3 bench/validate_scale.py build --base /tmp/m8b/base --adapter /tmp/m8b/lora --quant awq --target trt-llm --logs $OUT --json-out $OUT/rows.jsonl > $OUT/trtllm-bench.log 2>&1
echo "trt-llm rc $? at ${SECONDS}s"; tail -3 $OUT/trtllm-bench.log
echo "[$SECONDS s] torch-compile gptq"
timeout $((590 - SECONDS)) python3 bench/validate_scale.py build --base /tmp/m8b/base --adapter /tmp/m8b/lora --quant gptq --target torch-compile --logs $OUT --json-out $OUT/rows.jsonl > $OUT/tc-bench.log 2>&1
echo "torch-compile rc $? at ${SECONDS}s"; tail -3 $OUT/tc-bench.log
grep -h "done (\|greedy\|fused" $OUT/build-*.log | grep -v layer | cut -c1-250
echo "[$SECONDS s] spec (the bench's spec engine now takes the fused kernels up to a verify's rows)"
timeout $((590 - SECONDS)) python3 bench/torch_bench.py --device cuda --shape llama3-8b --sections spec --spec-k 2,4 --out $OUT/spec.json > $OUT/spec.log 2>&1
echo "spec rc $? at ${SECONDS}s"; grep -E "spec |rror" $OUT/spec.log | cut -c1-300
