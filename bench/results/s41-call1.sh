# Session 41, call 1 (an H200 if one comes; any card otherwise). Issue 15's speculative line at 8B on this card
# (section specwide: the trained demo widened to llama3-8b, its int4 g128 draft, fused decode auto, rounds chained),
# not measured on an H200 since session 27: k = 4 with the draft's lm_head as stored (bf16: `--speculative int4`
# until session 41), then with it int8 per channel (as `--speculative int4` now quantizes it at load; the verify
# is the bf16 model's, so the output cannot change) at k = 4 and 5; then issue 15's table on this main (s40-table.sh: copy, bf16, int4 + int8 head, profile, mixed,
# e2e) if 230 s remain. Pass LIMIT=.
source bench/results/device_env.sh || exit 3
LIMIT=${LIMIT:-590}
nvidia-smi --query-gpu=name --format=csv,noheader
spec() {  # spec NAME ARGS...
  local name=$1; shift
  timeout $((LIMIT - 20 - SECONDS < 200 ? LIMIT - 20 - SECONDS : 200)) python3 bench/torch_bench.py --device cuda --shape llama3-8b --sections copy,specwide --overlap-rounds on --new-tokens 128 --spec-repeats 2 "$@" --out $OUT/$name.json > $OUT/$name.log 2>&1
  echo "$name rc $? at ${SECONDS}s"; grep -E "specwide k|alone:|copy:|rror" $OUT/$name.log | cut -c1-420
}
spec spec_head16 --spec-k 4 --draft-head stored
[ $((LIMIT - SECONDS)) -ge 150 ] && spec spec_head8 --spec-k 4,5 --draft-head int8
if [ $((LIMIT - SECONDS)) -ge 230 ]; then
  LIMIT=$((LIMIT - SECONDS)) bash bench/results/s40-table.sh 2>&1 | grep -v "^main "
  (cd $OUT && tar xzf call.tgz && rm call.tgz)
fi
(cd $OUT && tar czf /tmp/call.tgz . && rm -rf ./* && mv /tmp/call.tgz .)
