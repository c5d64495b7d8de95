# Session 34, call 2: SmoothQuant W8A8 on CUDA (runtime/linear.py W8A8Linear, the int8 GEMM torch._int_mm).
# Its CUDA tests; the check-shape model compiled against the eager fake-quant runtime; each 8B linear as a
# SmoothQuant layer (bf16 / what ran before / W8A8Linear, compiled, CUDA-graph timed); then bf16 against a
# SmoothQuant 8B model in our runtime at batch 1, 8 and 32, one process. Pass LIMIT=.
source bench/results/device_env.sh || exit 3
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/runtime/test_linear.py -k w8a8 > $OUT/cuda_tests.txt 2>&1
echo "w8a8 CUDA tests rc $? at ${SECONDS}s"; tail -2 $OUT/cuda_tests.txt
timeout $((${LIMIT:-590} - 15 - SECONDS)) python3 bench/torch_bench.py --device cuda --shape llama3-8b --sections w8a8check,w8a8k,copy,bf16,w8a8 --batch 1,8,32 --single-step-peer 0 --new-tokens 128 --w8a8-rows 1,8,32,256 --out $OUT/w8a8.json > $OUT/w8a8.log 2>&1
echo "bench rc $? at ${SECONDS}s"; grep -iE "error|Traceback" $OUT/w8a8.log | head -5
python3 bench/results/w8a8_summary.py $OUT/w8a8.json
(cd $OUT && tar czf /tmp/call.tgz . && rm -rf ./* && mv /tmp/call.tgz .)
