# Session 10 lead call C: GEMV CUDA test, rtdec-A (profile/overlap/pdl/e2e), awq-gptq 8B quantize time, runtime_load, DEQUANT cell.
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 3
echo "main $(cat .devq/commit)"; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
( python3 scripts/make_model.py both /tmp/m8b --preset llama3-8b --dtype bfloat16 --device cuda > /tmp/make_model.log 2>&1; echo "make_model rc $?" >> /tmp/make_model.log ) &
MM=$!
timeout 70 python3 -m pytest -q -p no:cacheprovider -n 4 tests/runtime/test_triton_gemv.py > $OUT/cuda_tests_gemv.txt 2>&1
echo "gemv tests rc $? at ${SECONDS}s" | tee -a $OUT/cuda_tests_gemv.txt; tail -2 $OUT/cuda_tests_gemv.txt
wait $MM; tail -1 /tmp/make_model.log; echo "[$SECONDS s] rtdec-A"
timeout 170 python3 bench/torch_bench.py --device cuda --shape llama3-8b --sections profile,overlap,pdl,e2e --profile bf16 --batch 1,32 --new-tokens 128 --e2e-repeats 5 --budget-s 70 --out $OUT/torch_h200_s10_rtdecA.json > $OUT/torch_h200_s10_rtdecA.log 2>&1
echo "rtdec-A rc $? at ${SECONDS}s"; grep -v "^\s*$" $OUT/torch_h200_s10_rtdecA.log | tail -45
echo "[$SECONDS s] awq-gptq build (no validate)"
timeout $((480 - SECONDS)) python3 bench/validate_scale.py build --base /tmp/m8b/base --adapter /tmp/m8b/lora --quant awq-gptq --target trt-llm --logs $OUT --json-out $OUT/rows.jsonl -- --no-validate > $OUT/awqgptq-bench.log 2>&1
echo "awq-gptq rc $? at ${SECONDS}s"; tail -3 $OUT/awqgptq-bench.log; grep -h "done (" $OUT/*.log 2>/dev/null | grep -v "layer" | tail -8
echo "[$SECONDS s] runtime_load"
timeout $((560 - SECONDS)) python3 bench/runtime_load.py --shape llama3-8b --old-layers 4 --out /tmp/runtime_load_s10.json > $OUT/runtime_load_s10.log 2>&1
echo "runtime_load rc $? at ${SECONDS}s"; tail -25 $OUT/runtime_load_s10.log
echo "[$SECONDS s] dequant cell"
timeout $((595 - SECONDS)) python3 bench/int4_kernels.py --shapes llama3-8b --rows 64,128,256 --reuse-old --sweep dequant --budget-s 20 --out /tmp/int4_dequant_s10.json > $OUT/int4_dequant_s10.log 2>&1
echo "dequant rc $? at ${SECONDS}s"; tail -25 $OUT/int4_dequant_s10.log
