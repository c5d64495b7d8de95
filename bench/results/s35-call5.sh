# Session 35, call 5: main as it ends the session. The int8 and W8A8 CUDA tests; then in one process bf16, the
# SmoothQuant 8B model (the W8A8 GEMV with gemv_config's tiles) and the int8 weight-only 8B model (the shipped
# H100 int8 table, read from the package) at batch 1, 8, 32. Pass LIMIT=.
source bench/results/device_env.sh || exit 3
nvidia-smi --query-gpu=name --format=csv,noheader
export LORAFAST_CACHE=/tmp/lc35-5  # no tuned table: the shipped one
timeout 180 python3 -m pytest -q -p no:cacheprovider tests/runtime/test_triton_w8a8.py tests/runtime/test_triton_int8.py tests/runtime/test_linear.py > $OUT/cuda_tests.txt 2>&1
echo "CUDA tests rc $? at ${SECONDS}s"; tail -2 $OUT/cuda_tests.txt; grep -E "^FAILED|Error" $OUT/cuda_tests.txt | head -5
timeout $((${LIMIT:-590} - 10 - SECONDS)) python3 bench/torch_bench.py --device cuda --shape llama3-8b --sections copy,bf16,w8a8,int8 --batch 1,8,32 --single-step-peer 0 --new-tokens 128 --out $OUT/e2e.json > $OUT/e2e.log 2>&1
echo "e2e rc $? at ${SECONDS}s"; grep -iE "error|Traceback" $OUT/e2e.log | head -5
python3 bench/results/w8a8_summary.py $OUT/e2e.json
(cd $OUT && tar czf /tmp/call.tgz . && rm -rf ./* && mv /tmp/call.tgz .)
