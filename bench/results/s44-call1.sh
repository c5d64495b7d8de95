# Session 44, call 1 (an H100 or H200): session 43's call 5 (the CLI end to end at 8B after the graph-room fix: run
# vs run --speculative int4, the same text?, load times; then bench --speculative int4), then, with time left, an
# untabled shape (torch_bench's "small": hidden 512) at batch 1 with fused_decode on (CUDA-core kernels, their
# default tiles) against mma (MMA_DEFAULT): what auto now picks on an H100 for shapes without a table.
LIMIT=430 bash bench/results/s43-call5.sh
source bench/results/device_env.sh > /dev/null || exit 3
REM=$((575 - SECONDS))
if (( REM > 60 )); then
  timeout $REM python3 bench/torch_bench.py --device cuda --shape small --sections fused --fused-tiles mma-shipped --fused-batches 1 --out $OUT/small_fused.json > $OUT/small_fused.log 2>&1
  echo "small fused rc $? at ${SECONDS}s"; grep -E "fused batch|rror" $OUT/small_fused.log | cut -c1-600
else
  echo "no time left for the small shape (${REM}s)"
fi
