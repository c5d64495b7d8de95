# Session 41, call 1 (an H200 if one comes; any card otherwise). Issue 15's speculative line at 8B on this card
# (section specwide: the trained demo widened to llama3-8b, its int4 g128 draft, k = 4, fused decode auto,
# rounds chained off and on), never measured on an H200; then issue 15's table on this main
# (s40-table.sh: copy, bf16, int4 + int8 head, profile, mixed, e2e) if 230 s remain. Pass LIMIT=.
source bench/results/device_env.sh || exit 3
LIMIT=${LIMIT:-590}
nvidia-smi --query-gpu=name --format=csv,noheader
timeout $((LIMIT < 240 ? LIMIT - 20 : 220)) python3 bench/torch_bench.py --device cuda --shape llama3-8b --sections copy,specwide --spec-k 4 --overlap-rounds ab --new-tokens 128 --spec-repeats 2 --out $OUT/spec.json > $OUT/spec.log 2>&1
echo "specwide rc $? at ${SECONDS}s"; grep -E "specwide k|alone:|copy:|rror" $OUT/spec.log | cut -c1-420
if [ $((LIMIT - SECONDS)) -ge 230 ]; then
  LIMIT=$((LIMIT - SECONDS)) bash bench/results/s40-table.sh 2>&1 | grep -v "^main "
  (cd $OUT && tar xzf call.tgz && rm call.tgz)
fi
(cd $OUT && tar czf /tmp/call.tgz . && rm -rf ./* && mv /tmp/call.tgz .)
