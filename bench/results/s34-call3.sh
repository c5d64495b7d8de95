# Session 34, call 3: where W8A8Linear's time goes at prefill row counts (bench/results/s34_intmm.py). Pass LIMIT=.
source bench/results/device_env.sh || exit 3
nvidia-smi --query-gpu=name --format=csv,noheader
timeout $((${LIMIT:-590} - 15 - SECONDS)) python3 bench/results/s34_intmm.py $OUT/intmm.json > $OUT/intmm.log 2>&1
echo "intmm rc $? at ${SECONDS}s"; grep -E "^\{" $OUT/intmm.log | cut -c1-400; grep -iE "error|Traceback" $OUT/intmm.log | head -5
(cd $OUT && tar czf /tmp/call.tgz . && rm -rf ./* && mv /tmp/call.tgz .)
