# Session 43, call 2 (H100 or H200): the tensor-core fused ops in one kernel at every split and with pairs (MMA_LAST:
# the last program of an output block sums the partials and runs the epilogue), their weights through TMA or not:
# each op of the 8B shape at 1 and 4 rows (torch_bench fused --fused-tiles mma-last), the 1-row best into MMA_TABLE,
# then batch-1 decode fused_decode on (CUDA-core) against mma with that table, 3 interleaved runs; then the CUDA tests.
source bench/results/device_env.sh || exit 3
LIMIT=${LIMIT:-560}
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 380 python3 bench/torch_bench.py --device cuda --shape llama3-8b --sections fused --fused-tiles mma-last --fused-batches 1 --gemv-budget-s 240 --out $OUT/last.json > $OUT/last.log 2>&1
echo "fused rc $? at ${SECONDS}s"; grep -E "fused op|fused batch|fused table|rror" $OUT/last.log | cut -c1-400
timeout $((LIMIT - SECONDS - 3)) python3 -m pytest -q -x -p no:cacheprovider tests/runtime/test_triton_fused.py > $OUT/tests.log 2>&1
echo "tests rc $? at ${SECONDS}s"; tail -3 $OUT/tests.log | cut -c1-600
