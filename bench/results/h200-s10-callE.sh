# Session 10 lead call E: the refit's CUDA tests; the headline 8B build (trt-llm + awq, default validation, cold caches);
# (the headline build dropped: device time) the torch-compile + gptq 8B build (gptq now with the scale refit); awq-gptq's quantize stage (no validation).
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 3
echo "main $(cat .devq/commit)"
( python3 scripts/make_model.py both /tmp/m8b --preset llama3-8b --dtype bfloat16 --device cuda > /tmp/make_model.log 2>&1; echo "make_model rc $?" >> /tmp/make_model.log ) &
MM=$!
timeout 60 python3 -m pytest -q -p no:cacheprovider tests/quant/test_cuda.py > $OUT/cuda_tests_quant.txt 2>&1
echo "quant cuda tests rc $? at ${SECONDS}s" | tee -a $OUT/cuda_tests_quant.txt; tail -2 $OUT/cuda_tests_quant.txt
wait $MM; tail -1 /tmp/make_model.log
echo "[$SECONDS s] torch-compile gptq"
timeout $((330 - SECONDS)) python3 bench/validate_scale.py build --base /tmp/m8b/base --adapter /tmp/m8b/lora --quant gptq --target torch-compile --logs $OUT --json-out $OUT/rows.jsonl > $OUT/tc-bench.log 2>&1
echo "tc rc $? at ${SECONDS}s"; tail -3 $OUT/tc-bench.log
echo "[$SECONDS s] awq-gptq (no validate)"
timeout $((560 - SECONDS)) python3 bench/validate_scale.py build --base /tmp/m8b/base --adapter /tmp/m8b/lora --quant awq-gptq --target trt-llm --logs $OUT --json-out $OUT/rows.jsonl -- --no-validate > /tmp/awqgptq-bench.log 2>&1
echo "awq-gptq rc $? at ${SECONDS}s"; tail -3 /tmp/awqgptq-bench.log
grep -h "done (" $OUT/build-*.log | grep -v layer
