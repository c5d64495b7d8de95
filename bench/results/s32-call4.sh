# Session 32, call 4 (an H100, with the H100 int4 table of calls B and 2 in the working tree: rows 1-64): the int4 and
# speculative CUDA tests on it, then speculative decoding on the demo-shaped model (section specdemo, the trained demo
# itself: the second speculative line) with fused_decode mma, k = 4, rounds chained off / on. LIMIT= as usual.
source bench/results/device_env.sh || exit 3
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 240 python3 -m pytest -q -rs -p no:cacheprovider tests/runtime/test_triton_int4.py tests/runtime/test_linear.py tests/runtime/test_kernel_tune.py tests/runtime/test_speculative.py tests/runtime/test_triton_fused.py > $OUT/cuda_tests.txt 2>&1
echo "CUDA tests rc $? at ${SECONDS}s"; tail -3 $OUT/cuda_tests.txt
timeout $((${LIMIT:-590} - 10 - SECONDS)) python3 bench/torch_bench.py --device cuda --sections specdemo --fused-decode mma --spec-k 4 --overlap-rounds ab --new-tokens 128 --spec-repeats 3 --out $OUT/specdemo.json > $OUT/specdemo.log 2>&1
echo "specdemo rc $? at ${SECONDS}s"; grep -E "specdemo|alone|rror" $OUT/specdemo.log | cut -c1-400 | tail -8
(cd $OUT && tar czf /tmp/call.tgz . && rm -rf ./* && mv /tmp/call.tgz .)
