# Session 41, call 2 (short budget; any card): speculation at 8B (section specwide, k = 4, rounds chained, fused
# decode auto) with the draft's lm_head int8 (what `--speculative int4` gives it since session 41), then, if 150 s
# remain, the same with the head as stored (bf16) for the pair. Pass LIMIT=.
source bench/results/device_env.sh || exit 3
LIMIT=${LIMIT:-420}
nvidia-smi --query-gpu=name --format=csv,noheader
spec() {  # spec NAME ARGS...
  local name=$1; shift
  timeout $((LIMIT - 15 - SECONDS < 190 ? LIMIT - 15 - SECONDS : 190)) python3 bench/torch_bench.py --device cuda --shape llama3-8b --sections specwide --overlap-rounds on --new-tokens 128 --spec-repeats 2 --spec-k 4 "$@" --out $OUT/$name.json > $OUT/$name.log 2>&1
  echo "$name rc $? at ${SECONDS}s"; grep -E "specwide k|alone:|rror" $OUT/$name.log | cut -c1-420
}
spec spec_head8 --draft-head int8
[ $((LIMIT - SECONDS)) -ge 150 ] && spec spec_head16 --draft-head stored
