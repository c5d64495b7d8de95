# Session 43, call 3 (H100 or H200): speculation at 8B (specwide: the trained demo widened, int4 g128 draft with the
# int8 head, k = 4, rounds chained) at the default options, where fused_decode auto on an H100 now runs the tensor
# cores at every row with or without a draft; against the default runtime alone and the fused_decode=on runtime
# alone (the CUDA-core kernels), same process; then the CUDA tests of the fused ops and runtimes.
source bench/results/device_env.sh || exit 3
LIMIT=${LIMIT:-560}
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 330 python3 bench/torch_bench.py --device cuda --shape llama3-8b --sections specwide --overlap-rounds on --new-tokens 128 --spec-repeats 3 --spec-k 4 --draft-head int8 --spec-vs-default --out $OUT/spec.json > $OUT/spec.log 2>&1
echo "spec rc $? at ${SECONDS}s"; grep -E "fused decode kernels|specwide k|alone:|rror" $OUT/spec.log | cut -c1-700
python3 -c "import json; r=json.load(open('$OUT/spec.json'))['specwide']; print({k: (r[k]['decode_tokens_per_s'] if isinstance(r[k], dict) else r[k]) for k in ('bf16_alone','default_alone','on_alone','alone_tokens_equal_default','alone_tokens_equal_on') if k in r})" 2>&1 | tail -1
timeout $((LIMIT - SECONDS - 3)) python3 -m pytest -q -x -p no:cacheprovider tests/runtime/test_triton_fused.py > $OUT/tests.log 2>&1
echo "tests rc $? at ${SECONDS}s"; tail -3 $OUT/tests.log | cut -c1-600
