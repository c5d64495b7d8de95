# Session 42, call 3: the tensor-core fused ops with call 2's table (plain products of one split as one kernel; qkv +
# rope and gate/up as two kernels). (1) Section fused, --fused-tiles mma-shipped: each op at 1 and 4 rows, then the
# runtimes fused_decode on (the CUDA-core kernels at one row) against mma at batch 1, 3 interleaved runs, tokens
# compared. (2) The fused kernels' CUDA tests. (3) Speculation at 8B with mma (specwide, k = 4, rounds chained, int8
# draft head) against the default runtime alone.
source bench/results/device_env.sh || exit 3
LIMIT=${LIMIT:-560}
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 200 python3 bench/torch_bench.py --device cuda --shape llama3-8b --sections fused --fused-tiles mma-shipped --fused-batches 1 --out $OUT/fused.json > $OUT/fused.log 2>&1
echo "fused rc $? at ${SECONDS}s"; grep -E "fused op|fused batch|rror" $OUT/fused.log | cut -c1-330
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/runtime/test_triton_fused.py > $OUT/tests.log 2>&1
echo "tests rc $? at ${SECONDS}s"; tail -3 $OUT/tests.log | cut -c1-300
timeout $((LIMIT - SECONDS - 5)) python3 bench/torch_bench.py --device cuda --shape llama3-8b --sections specwide --overlap-rounds on --new-tokens 128 --spec-repeats 2 --spec-k 4 --draft-head int8 --fused-decode mma --spec-vs-default --out $OUT/spec.json > $OUT/spec.log 2>&1
echo "spec rc $? at ${SECONDS}s"; grep -E "specwide k|alone:|rror" $OUT/spec.log | cut -c1-600
python3 -c "import json; r=json.load(open('$OUT/spec.json'))['specwide']; print('default alone', r.get('default_alone',{}).get('decode_tokens_per_s'), 'alone tokens equal default', r.get('alone_tokens_equal_default'))" 2>&1 | tail -1
