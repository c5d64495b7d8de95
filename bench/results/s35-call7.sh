# Session 35, call 7: W8A8Linear on our kernels at every row count (call 6's 16-row split-K tiles at 2-31 rows).
# The W8A8 CUDA tests; torch_bench w8a8k at 1, 2, 4, 8, 16, 24 rows (bf16, W8A8 now, W8A8 on cuBLAS's int8 GEMM);
# the check model's compiled W8A8 runtime against the eager fake-quant one; bf16 against the SmoothQuant 8B model
# at batch 1, 8, 32, one process. Pass LIMIT=.
source bench/results/device_env.sh || exit 3
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/runtime/test_triton_w8a8.py tests/runtime/test_linear.py -k "w8a8 or gemv or tiles or wide" > $OUT/cuda_tests.txt 2>&1
echo "W8A8 CUDA tests rc $? at ${SECONDS}s"; tail -2 $OUT/cuda_tests.txt; grep -E "^FAILED|Error" $OUT/cuda_tests.txt | head -5
timeout 150 python3 bench/torch_bench.py --device cuda --shape llama3-8b --sections w8a8k --w8a8-rows 1,2,4,8,16,24 --out $OUT/w8a8k.json > $OUT/w8a8k.log 2>&1
echo "w8a8k rc $? at ${SECONDS}s"; python3 bench/results/w8a8_summary.py $OUT/w8a8k.json | grep -v before
timeout $((${LIMIT:-590} - 10 - SECONDS)) python3 bench/torch_bench.py --device cuda --shape llama3-8b --sections w8a8check,copy,bf16,w8a8 --batch 1,8,32 --single-step-peer 0 --new-tokens 128 --out $OUT/e2e.json > $OUT/e2e.log 2>&1
echo "e2e rc $? at ${SECONDS}s"; grep -iE "error|Traceback" $OUT/e2e.log | head -5
python3 bench/results/w8a8_summary.py $OUT/e2e.json
(cd $OUT && tar czf /tmp/call.tgz . && rm -rf ./* && mv /tmp/call.tgz .)
