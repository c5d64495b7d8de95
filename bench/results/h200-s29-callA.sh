# For session 29 (an H200, kind nvidia-h200): the dense fused ops on the tensor cores (fused_decode=mma), tuned and
# timed. (1) The fused tests on CUDA. (2) One process: section fused with --fused-tiles mma-sweep (each fused op's
# tensor-core configurations at 1 and 4 rows on the 8B shapes; the fastest at 1 row into MMA_TABLE in the process),
# then the runtimes fused_decode on against mma at batch 1 and 4 (3 interleaved runs), then specwide with mma and
# the swept table (k = 2, 4 always, k = 4 auto judged on the warm engine). Copy the printed table into MMA_TABLE if
# it wins. Pass LIMIT= the seconds the call may run.
source bench/results/device_env.sh || exit 3
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 150 python3 -m pytest -q -rs -p no:cacheprovider tests/runtime/test_triton_fused.py > $OUT/cuda_tests.txt 2>&1
echo "fused tests rc $? at ${SECONDS}s"; tail -2 $OUT/cuda_tests.txt
timeout $((${LIMIT:-590} - 10 - SECONDS)) python3 bench/torch_bench.py --device cuda --shape llama3-8b --sections copy,fused,specwide --fused-tiles mma-sweep --fused-batches 1,4 --fused-decode mma --gemv-budget-s 240 --spec-k 2,4 --new-tokens 128 --spec-repeats 3 --out $OUT/mma.json > $OUT/mma.log 2>&1
echo "fused mma-sweep + specwide rc $? at ${SECONDS}s"; grep -E "fused op|fused table|fused batch|specwide k|alone:" $OUT/mma.log | cut -c1-300
(cd $OUT && tar czf /tmp/call.tgz . && rm -rf ./* && mv /tmp/call.tgz .)
