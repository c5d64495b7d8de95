# Session 35, call 6: the W8A8 GEMM with split K (CUDA tests), then at 2-24 rows against W8A8Linear's cuBLAS
# path on the 8B linears (s35_w8a8_small.py: 16-row tiles, 32 configs). Pass LIMIT=.
source bench/results/device_env.sh || exit 3
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/runtime/test_triton_w8a8.py > $OUT/cuda_tests.txt 2>&1
echo "W8A8 CUDA tests rc $? at ${SECONDS}s"; tail -2 $OUT/cuda_tests.txt; grep -E "^FAILED|Error" $OUT/cuda_tests.txt | head -5
timeout $((${LIMIT:-590} - 10 - SECONDS)) python3 bench/results/s35_w8a8_small.py $OUT/small.json > $OUT/small.log 2>&1
echo "small rc $? at ${SECONDS}s"; grep -E "^rows|Error|Traceback" $OUT/small.log
(cd $OUT && tar czf /tmp/call.tgz . && rm -rf ./* && mv /tmp/call.tgz .)
