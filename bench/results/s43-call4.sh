# Session 43, call 4: H200 only (an H100 exits at once). Whether the H200 joins MMA_AUTO_GPUS: batch-1 decode with
# fused_decode on (CUDA-core) against mma (section fused, shipped tables, 3 interleaved runs), then speculation at 8B
# (specwide, int4 draft with the int8 head, k = 4, rounds chained) with mma, against the default runtime alone.
source bench/results/device_env.sh || exit 3
LIMIT=${LIMIT:-560}
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader); echo "$GPU"
[[ "$GPU" == *H200* ]] || { echo "not an H200: nothing to run"; exit 0; }
timeout 170 python3 bench/torch_bench.py --device cuda --shape llama3-8b --sections fused --fused-tiles mma-shipped --fused-batches 1 --out $OUT/fused.json > $OUT/fused.log 2>&1
echo "fused rc $? at ${SECONDS}s"; grep -E "fused op|fused batch|rror" $OUT/fused.log | cut -c1-400
timeout $((LIMIT - SECONDS - 5)) python3 bench/torch_bench.py --device cuda --shape llama3-8b --sections specwide --overlap-rounds on --new-tokens 128 --spec-repeats 2 --spec-k 4 --draft-head int8 --fused-decode mma --spec-vs-default --out $OUT/spec.json > $OUT/spec.log 2>&1
echo "spec rc $? at ${SECONDS}s"; grep -E "specwide k|alone:|rror" $OUT/spec.log | cut -c1-700
