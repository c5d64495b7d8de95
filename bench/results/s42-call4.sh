# Session 42, call 4 (kind nvidia-h200, which may bring an H100): speculation at 8B (specwide, k = 4, rounds chained,
# int8 draft head) against the default runtime alone. On an H100: the default options, whose fused_decode auto now
# takes the tensor cores at every row with a draft (loader.fused_mma_from). On an H200 (not in MMA_AUTO_GPUS): first
# the runtimes fused_decode on against mma at batch 1 (section fused, shipped tables), then specwide with mma.
source bench/results/device_env.sh || exit 3
LIMIT=${LIMIT:-400}
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader); echo "$GPU"
FD=""
if [[ "$GPU" == *H200* ]]; then
  FD="--fused-decode mma"
  timeout 150 python3 bench/torch_bench.py --device cuda --shape llama3-8b --sections fused --fused-tiles mma-shipped --fused-batches 1 --out $OUT/fused.json > $OUT/fused.log 2>&1
  echo "fused rc $? at ${SECONDS}s"; grep -E "fused op|fused batch|rror" $OUT/fused.log | cut -c1-330
fi
timeout $((LIMIT - SECONDS - 5)) python3 bench/torch_bench.py --device cuda --shape llama3-8b --sections specwide --overlap-rounds on --new-tokens 128 --spec-repeats 2 --spec-k 4 --draft-head int8 $FD --spec-vs-default --out $OUT/spec.json > $OUT/spec.log 2>&1
echo "spec ($FD) rc $? at ${SECONDS}s"; grep -E "fused decode kernels|specwide k|alone:|rror" $OUT/spec.log | cut -c1-600
python3 -c "import json; r=json.load(open('$OUT/spec.json'))['specwide']; print('default alone', r.get('default_alone',{}).get('decode_tokens_per_s'), 'alone tokens equal default', r.get('alone_tokens_equal_default'))" 2>&1 | tail -1
timeout $((LIMIT - SECONDS - 3)) python3 -m pytest -q -x -p no:cacheprovider tests/runtime/test_triton_fused.py > $OUT/tests.log 2>&1
echo "tests rc $? at ${SECONDS}s"; tail -2 $OUT/tests.log | cut -c1-300
