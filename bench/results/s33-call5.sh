# Session 33, call 5 (an H100): bench/results/s33_warm.py with prefill_chunk 2048 (the new default) and 0, each
# in its own process with a cold inductor cache. Pass LIMIT=.
source bench/results/device_env.sh || exit 3
nvidia-smi --query-gpu=name --format=csv,noheader
for c in 2048 0; do
TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) timeout $(( (${LIMIT:-300} - SECONDS) / (c ? 2 : 1) )) python3 bench/results/s33_warm.py $c > $OUT/warm$c.log 2>&1
echo "prefill_chunk $c rc $? at ${SECONDS}s"; grep '^{' $OUT/warm$c.log; grep -iE "error|Traceback" $OUT/warm$c.log | head -3
done
