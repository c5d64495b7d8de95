# Session 15 lead call C: call B again after its two fixes (int4 fused kernels compile; warm-up sizes), with dynamo recompiles logged.
# epilogue refactor, warm-up), the int4 fused tile sweep against today's int4 kernels (merged into the table the
# runtime reads), then bf16 / int4 at batch 1 and 32 and the mixed workload's first pass with that table.
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 3
echo "main $(cat .devq/commit)"
timeout 170 python3 -m pytest -q -p no:cacheprovider tests/runtime/test_triton_fused_int4.py tests/runtime/test_triton_fused.py tests/runtime/test_warm_up_cuda.py > $OUT/cuda_tests.txt 2>&1
echo "cuda tests rc $? at ${SECONDS}s"; tail -4 $OUT/cuda_tests.txt
timeout 200 python3 bench/int4_fused_bench.py --budget-s 170 --json-out $OUT/int4_fused.json --merge-into lorafast_export/data/kernels/fused_int4_h200.json > $OUT/int4_fused.log 2>&1
echo "sweep rc $? at ${SECONDS}s"; cp lorafast_export/data/kernels/fused_int4_h200.json $OUT/ 2>/dev/null; grep -v "^  tile" $OUT/int4_fused.log | tail -60 | cut -c1-250
TORCH_LOGS=recompiles timeout $((595 - SECONDS)) python3 bench/torch_bench.py --device cuda --shape llama3-8b --sections copy,bf16,int4,mixed --batch 1,32 --single-step-peer 0 --mixed-peer none --mixed-policies default --out $OUT/table.json > $OUT/table.log 2>&1
echo "bench rc $? at ${SECONDS}s"; grep -E "^\[|mixed|rror|Recompiling" $OUT/table.log | cut -c1-300
