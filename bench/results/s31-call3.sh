# Session 31, call 3 (what the budget left after seven refused requests allows, ~4-5 minutes): on an H100, specwide
# k = 4 with fused_decode mma and rounds chained off / on, its int4 draft on the shipped H100 table (MMA kernel and
# fused ops at one row); on an H200, call E without its CUDA tests. Pass LIMIT= the seconds it may run.
source bench/results/device_env.sh || exit 3
GPU="$(nvidia-smi --query-gpu=name --format=csv,noheader)"; echo "$GPU"
case "$GPU" in
  *H200*) ARGS="--sections copy,fused,specwide --fused-tiles mma-shipped --fused-batches 1,2,4,8 --gemv-budget-s 40" ;;
  *) ARGS="--sections copy,specwide" ;;
esac
timeout $((${LIMIT:-590} - 10 - SECONDS)) python3 bench/torch_bench.py --device cuda --shape llama3-8b $ARGS --fused-decode mma --spec-k 4 --overlap-rounds ab --new-tokens 128 --spec-repeats 2 --out $OUT/spec3.json > $OUT/spec3.log 2>&1
echo "rc $? at ${SECONDS}s"; grep -E "fused op|fused batch|specwide k|alone:|copy:|rror" $OUT/spec3.log | cut -c1-400
(cd $OUT && tar czf /tmp/call.tgz . && rm -rf ./* && mv /tmp/call.tgz .)
