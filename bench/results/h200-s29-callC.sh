# Session 29, call C (an H200 if one comes, else an H100). (1) The fused CUDA tests of the new default (fused_decode
# auto on sm_90 without a draft: CUDA-core kernels at one row, tensor cores at 2-8) and of a draft's runtime. (2) One
# process: fused with --fused-tiles mma-shipped (on against mma at batch 1, 2, 4, 8), then specwide with mma at
# k = 4, always and auto, the spec engines warmed up as the loader warms a runtime (call B's auto rows compiled
# mid-run), auto's decisions printed. (3) bf16 at batch 1, 4 and 8 with the default options (the new auto).
source bench/results/device_env.sh || exit 3
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 120 python3 -m pytest -q -rs -p no:cacheprovider tests/runtime/test_triton_fused.py -k "auto_mma or fused_mma_from or speculative or verify" > $OUT/cuda_tests.txt 2>&1
echo "fused tests rc $? at ${SECONDS}s"; tail -2 $OUT/cuda_tests.txt
timeout $((${LIMIT:-590} - 130 - SECONDS)) python3 bench/torch_bench.py --device cuda --shape llama3-8b --sections copy,fused,specwide --fused-tiles mma-shipped --fused-batches 1,2,4,8 --fused-decode mma --gemv-budget-s 60 --spec-k 4 --new-tokens 128 --spec-repeats 3 --out $OUT/mmaC.json > $OUT/mmaC.log 2>&1
echo "fused + specwide rc $? at ${SECONDS}s"; grep -E "fused batch|specwide k|alone:|copy:" $OUT/mmaC.log | cut -c1-600
timeout $((${LIMIT:-590} - 10 - SECONDS)) python3 bench/torch_bench.py --device cuda --shape llama3-8b --sections bf16 --batch 1,4,8 --new-tokens 128 --out $OUT/autoC.json > $OUT/autoC.log 2>&1
echo "bf16 auto rc $? at ${SECONDS}s"; grep -iE "fused decode|tok/s|bf16" $OUT/autoC.log | cut -c1-400 | tail -12
(cd $OUT && tar czf /tmp/call.tgz . && rm -rf ./* && mv /tmp/call.tgz .)
