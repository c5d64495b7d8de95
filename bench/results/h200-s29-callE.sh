# Session 29, call E (an H200 only: whether fused_decode auto should take the tensor cores at 2-8 rows there too,
# loader.MMA_AUTO_GPUS). One process: fused with --fused-tiles mma-shipped (on against mma at batch 1, 2, 4, 8), then
# specwide with mma at k = 4, always, always with rounds chained on the device (overlap_rounds) and auto (spec
# engines warmed up). Pass LIMIT= the seconds the call may run. (Written in session 29; call E ran it on an H100
# before the overlap rows were added.)
source bench/results/device_env.sh || exit 3
nvidia-smi --query-gpu=name --format=csv,noheader
# the speculative runtime's CUDA tests first: the draft steps' positions and slots on the device and overlap_rounds
# (both added after call E ran) have not yet run on a GPU
timeout 120 python3 -m pytest -q -rs -p no:cacheprovider tests/runtime/test_triton_fused.py -k "speculative or verify or auto_mma" > $OUT/cuda_tests.txt 2>&1
echo "fused draft tests rc $? at ${SECONDS}s"; tail -2 $OUT/cuda_tests.txt
timeout $((${LIMIT:-590} - 10 - SECONDS)) python3 bench/torch_bench.py --device cuda --shape llama3-8b --sections copy,fused,specwide --fused-tiles mma-shipped --fused-batches 1,2,4,8 --fused-decode mma --gemv-budget-s 60 --spec-k 4 --overlap-rounds ab --new-tokens 128 --spec-repeats 3 --out $OUT/mmaE.json > $OUT/mmaE.log 2>&1
echo "fused + specwide rc $? at ${SECONDS}s"; grep -E "fused op|fused batch|specwide k|alone:|copy:" $OUT/mmaE.log | cut -c1-500
(cd $OUT && tar czf /tmp/call.tgz . && rm -rf ./* && mv /tmp/call.tgz .)
