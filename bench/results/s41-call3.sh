# Session 41, call 3 (short budget; any card): speculation at 8B (section specwide, k = 4, rounds chained, the
# draft's head int8) with fused_decode mma (the verify's products on the tensor cores, flat from 1 to 8 rows) and,
# for the tokens and the rate to compare with, the default runtime alone (fused_decode / dense_gemv auto, no
# draft: `--spec-vs-default`). Call 2 ran the default options with the draft (1.21x). Pass LIMIT=.
source bench/results/device_env.sh || exit 3
LIMIT=${LIMIT:-300}
nvidia-smi --query-gpu=name --format=csv,noheader
timeout $((LIMIT - 15)) python3 bench/torch_bench.py --device cuda --shape llama3-8b --sections specwide --overlap-rounds on --new-tokens 128 --spec-repeats 2 --spec-k 4 --draft-head int8 --fused-decode mma --spec-vs-default --out $OUT/spec_mma.json > $OUT/spec_mma.log 2>&1
echo "spec_mma rc $? at ${SECONDS}s"; grep -E "specwide k|alone:|rror" $OUT/spec_mma.log | cut -c1-600
python3 -c "import json; r=json.load(open('$OUT/spec_mma.json'))['specwide']; print('default alone', r.get('default_alone',{}).get('decode_tokens_per_s'), 'alone tokens equal default', r.get('alone_tokens_equal_default'))" 2>&1 | tail -1
