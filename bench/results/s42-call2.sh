# Session 42, call 2: the dense fused ops on the tensor cores with one split as one kernel (_mma_one_kernel: the
# epilogue in the product's kernel, no finishing kernel), so that fused_decode=mma may cost no more than the CUDA-core
# kernels at one row. (1) Section fused, --fused-tiles mma-one: the shipped MMA_TABLE configuration and 18
# one-split ones (BN 16-64) per 8B op at 1 and 4 rows, the fastest at 1 row into MMA_TABLE; then the runtimes
# fused_decode on (the CUDA-core kernels at one row) against mma at batch 1, 3 interleaved runs, tokens compared.
# (2) The CUDA tests of rows against the one-row call. (3) In a second process, speculation at 8B (specwide, k = 4,
# rounds chained, int8 draft head) with mma and (1)'s table, against the default runtime alone.
source bench/results/device_env.sh || exit 3
LIMIT=${LIMIT:-580}
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 300 python3 bench/torch_bench.py --device cuda --shape llama3-8b --sections fused --fused-tiles mma-one --fused-batches 1 --gemv-budget-s 170 --out $OUT/fused.json > $OUT/fused.log 2>&1
echo "fused rc $? at ${SECONDS}s"; grep -E "fused op|fused table|fused batch|rror" $OUT/fused.log | cut -c1-330
timeout 70 python3 -m pytest -q -x -p no:cacheprovider tests/runtime/test_triton_fused.py -k "independent or verify_rows or speculative_runtime or residual_add_norm" > $OUT/tests.log 2>&1
echo "tests rc $? at ${SECONDS}s"; tail -3 $OUT/tests.log | cut -c1-300
timeout $((LIMIT - SECONDS - 5)) python3 bench/torch_bench.py --device cuda --shape llama3-8b --sections specwide --overlap-rounds on --new-tokens 128 --spec-repeats 2 --spec-k 4 --draft-head int8 --fused-decode mma --mma-table $OUT/fused.json --spec-vs-default --out $OUT/spec.json > $OUT/spec.log 2>&1
echo "spec rc $? at ${SECONDS}s"; grep -E "MMA_TABLE|specwide k|alone:|rror" $OUT/spec.log | cut -c1-600
python3 -c "import json; r=json.load(open('$OUT/spec.json'))['specwide']; print('default alone', r.get('default_alone',{}).get('decode_tokens_per_s'), 'alone tokens equal default', r.get('alone_tokens_equal_default'))" 2>&1 | tail -1
