# Session 15 lead call A: load-time warm-up (Engine.warm_up). Its CUDA test, then bf16 at batch 1 and 32 and the
# mixed 32-request workload on the default policy, with a timed first pass right after the runtime's load.
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 3
echo "main $(cat .devq/commit)"
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/runtime/test_warm_up_cuda.py > $OUT/cuda_tests_warm_up.txt 2>&1
echo "warm-up test rc $? at ${SECONDS}s" | tee -a $OUT/cuda_tests_warm_up.txt; tail -3 $OUT/cuda_tests_warm_up.txt
TORCH_LOGS=recompiles timeout $((590 - SECONDS)) python3 bench/torch_bench.py --device cuda --shape llama3-8b --sections copy,bf16,mixed --batch 1,32 --single-step-peer 0 --mixed-peer none --mixed-policies default,default --out $OUT/table.json > $OUT/table.log 2>&1
echo "bench rc $? at ${SECONDS}s"; grep -E "^\[|mixed|rror|Recompiling|warm-up" $OUT/table.log | cut -c1-300
