# Session 29, call B (an H200 if one comes, else an H100): the tensor-core fused ops (fused_decode=mma) on call A's
# swept MMA_TABLE, and speculation's governor explained. (1) The fused CUDA tests of a draft's runtime (identity
# with mma, the round without its mid-round host wait). (2) One process: section fused with --fused-tiles
# mma-shipped (the shipped table's ops at 1 and 4 rows, then the runtimes fused_decode on against mma at batch 1, 2,
# 4 and 8), then specwide with mma (k = 2, 4 always with a round profile; k = 4 auto, each timed run with a fresh
# governor whose decisions are printed). Pass LIMIT= the seconds the call may run.
source bench/results/device_env.sh || exit 3
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 120 python3 -m pytest -q -rs -p no:cacheprovider tests/runtime/test_triton_fused.py -k "speculative or verify" > $OUT/cuda_tests.txt 2>&1
echo "fused draft tests rc $? at ${SECONDS}s"; tail -2 $OUT/cuda_tests.txt
timeout $((${LIMIT:-590} - 10 - SECONDS)) python3 bench/torch_bench.py --device cuda --shape llama3-8b --sections copy,fused,specwide --fused-tiles mma-shipped --fused-batches 1,2,4,8 --fused-decode mma --gemv-budget-s 60 --spec-k 2,4 --new-tokens 128 --spec-repeats 3 --spec-profile on --out $OUT/mmaB.json > $OUT/mmaB.log 2>&1
echo "fused mma-shipped + specwide rc $? at ${SECONDS}s"; grep -E "fused op|fused batch|specwide k|alone:|copy:" $OUT/mmaB.log | cut -c1-420
(cd $OUT && tar czf /tmp/call.tgz . && rm -rf ./* && mv /tmp/call.tgz .)
