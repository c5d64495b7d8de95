# Session 17 lead call A: the governor's CUDA test (a paused draft compiles nothing after warm-up), both 8B builds
# with default validation from cold caches (the headline trt-llm + awq, and torch-compile + gptq), then the mixed
# workload's first pass after load under torch.profiler + cProfile (--first-pass-profile 1) in a fresh process.
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 3
echo "main $(cat .devq/commit)"
timeout 110 python3 -m pytest -q -p no:cacheprovider tests/runtime/test_warm_up_cuda.py > $OUT/cuda_tests.txt 2>&1
echo "cuda tests rc $? at ${SECONDS}s" | tee -a $OUT/cuda_tests.txt; tail -3 $OUT/cuda_tests.txt
python3 scripts/make_model.py both /tmp/m8b --preset llama3-8b --dtype bfloat16 --device cuda > /tmp/make_model.log 2>&1; echo "make_model rc $? at ${SECONDS}s"
echo "[$SECONDS s] trt-llm awq (the headline)"
timeout 240 python3 bench/validate_scale.py build --base /tmp/m8b/base --adapter /tmp/m8b/lora --quant awq --target trt-llm --logs $OUT --json-out $OUT/rows.jsonl > $OUT/trtllm-bench.log 2>&1
echo "trt-llm rc $? at ${SECONDS}s"; tail -3 $OUT/trtllm-bench.log
echo "[$SECONDS s] torch-compile gptq"
timeout 240 python3 bench/validate_scale.py build --base /tmp/m8b/base --adapter /tmp/m8b/lora --quant gptq --target torch-compile --logs $OUT --json-out $OUT/rows.jsonl > $OUT/tc-bench.log 2>&1
echo "torch-compile rc $? at ${SECONDS}s"; tail -3 $OUT/tc-bench.log
grep -h "done (\|greedy\|fused" $OUT/build-*.log | grep -v layer | cut -c1-250
echo "[$SECONDS s] mixed first pass, profiled"
timeout $((592 - SECONDS)) python3 bench/torch_bench.py --device cuda --shape llama3-8b --sections mixed --batch 1 --single-step-peer 0 --mixed-peer none --mixed-policies default --first-pass-profile 1 --out $OUT/mixed_profile.json > $OUT/mixed_profile.log 2>&1
echo "mixed rc $? at ${SECONDS}s"; grep -E "mixed|_first_vs_again|rror" $OUT/mixed_profile.log | cut -c1-330
