# Session 24 call C: issue 15's table in one process on this session's main (as session 19 call C): copy, bf16 and
# int4 at batch 1 and 32, the mixed 32-request workload's first pass, end to end against transformers' static
# cache + compile (5 pairs), the 8B speculative rows and the trained demo's. First the device-guard tests (the
# two-GPU one skips on one GPU) and the warm-up CUDA tests.
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl 2>/dev/null && export PYTHONPATH=/tmp/site:$PWD || exit 3
echo "main $(cat .devq/commit)"
timeout 120 python3 -m pytest -q -rs -p no:cacheprovider tests/runtime/test_device_guard.py tests/runtime/test_warm_up_cuda.py > $OUT/cuda_tests.txt 2>&1
echo "cuda tests rc $? at ${SECONDS}s" | tee -a $OUT/cuda_tests.txt; grep -E "passed|failed|SKIP|Error" $OUT/cuda_tests.txt | tail -4
timeout $((590 - SECONDS)) python3 bench/torch_bench.py --device cuda --shape llama3-8b --sections copy,bf16,int4,mixed,e2e,spec,specdemo --batch 1,32 --single-step-peer 0 --mixed-peer none --mixed-policies default --e2e-repeats 5 --out $OUT/table.json > $OUT/table.log 2>&1
echo "table rc $? at ${SECONDS}s"; grep -E "^\[|mixed (first|default)" $OUT/table.log | cut -c1-160
python3 bench/results/table_summary.py $OUT/table.json 2>&1 | tail -20
