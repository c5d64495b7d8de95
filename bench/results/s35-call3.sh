# Session 35, call 3: SmoothQuant W8A8's Triton GEMV for 1-4 rows (runtime/triton_w8a8.gemv). (1) the W8A8 CUDA
# tests (the GEMV exact against int64 sums, W8A8Linear's GEMV rows against its cuBLAS path); (2) torch_bench w8a8k
# at 1, 2, 4, 8 and 16 rows: bf16, W8A8Linear as auto runs it now, and with cuBLAS's padded int8 GEMM at those
# rows (as before); (3) the check model's compiled W8A8 runtime against the eager fake-quant one, then bf16 against
# a SmoothQuant 8B model at batch 1, 8, 32, one process. Pass LIMIT=.
source bench/results/device_env.sh || exit 3
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/runtime/test_triton_w8a8.py tests/runtime/test_linear.py -k "w8a8 or gemv or tiles or wide" > $OUT/cuda_tests.txt 2>&1
echo "W8A8 CUDA tests rc $? at ${SECONDS}s"; tail -2 $OUT/cuda_tests.txt; grep -E "^FAILED|Error" $OUT/cuda_tests.txt | head -5
timeout 200 python3 bench/torch_bench.py --device cuda --shape llama3-8b --sections w8a8k --w8a8-rows 1,2,4,8,16 --out $OUT/w8a8k.json > $OUT/w8a8k.log 2>&1
echo "w8a8k rc $? at ${SECONDS}s"; python3 bench/results/w8a8_summary.py $OUT/w8a8k.json | grep -v before
timeout $((${LIMIT:-590} - 10 - SECONDS)) python3 bench/torch_bench.py --device cuda --shape llama3-8b --sections w8a8check,copy,bf16,w8a8 --batch 1,8,32 --single-step-peer 0 --new-tokens 128 --out $OUT/e2e.json > $OUT/e2e.log 2>&1
echo "e2e rc $? at ${SECONDS}s"; grep -iE "error|Traceback" $OUT/e2e.log | head -5
python3 bench/results/w8a8_summary.py $OUT/e2e.json
(cd $OUT && tar czf /tmp/call.tgz . && rm -rf ./* && mv /tmp/call.tgz .)
