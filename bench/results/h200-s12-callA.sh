# Session 12 lead call A: the greedy check's CUDA tests; the headline 8B build (trt-llm + awq, default validation,
# cold caches); awq-gptq's 8B quantize stage with this commit's default (--no-validate).
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 3
echo "main $(cat .devq/commit)"
( python3 scripts/make_model.py both /tmp/m8b --preset llama3-8b --dtype bfloat16 --device cuda > /tmp/make_model.log 2>&1; echo "make_model rc $?" >> /tmp/make_model.log ) &
MM=$!
timeout 60 python3 -m pytest -q -p no:cacheprovider tests/validate/test_greedy.py > $OUT/cuda_tests_greedy.txt 2>&1
echo "greedy tests rc $? at ${SECONDS}s" | tee -a $OUT/cuda_tests_greedy.txt; tail -2 $OUT/cuda_tests_greedy.txt
wait $MM; tail -1 /tmp/make_model.log
echo "[$SECONDS s] trt-llm awq (the headline)"
timeout $((330 - SECONDS)) python3 bench/validate_scale.py build --base /tmp/m8b/base --adapter /tmp/m8b/lora --quant awq --target trt-llm --logs $OUT --json-out $OUT/rows.jsonl > $OUT/trtllm-bench.log 2>&1
echo "trt-llm rc $? at ${SECONDS}s"; tail -3 $OUT/trtllm-bench.log
echo "[$SECONDS s] awq-gptq --no-validate"
timeout $((590 - SECONDS)) python3 bench/validate_scale.py build --base /tmp/m8b/base --adapter /tmp/m8b/lora --quant awq-gptq --target trt-llm --logs $OUT --json-out $OUT/rows.jsonl -- --no-validate > $OUT/awqgptq-bench.log 2>&1
echo "awq-gptq rc $? at ${SECONDS}s"; tail -3 $OUT/awqgptq-bench.log
grep -h "done (\|greedy" $OUT/build-*.log | grep -v layer
