# Session 34, call 1: whichever card comes. On an H200 (no H200 call since session 24): int4 with the lm_head
# quantized (--quant-lm-head) against bf16 at batch 1, then issue 15's table on this main (h200-s31-call2.sh).
# On an H100: s33-next-h100.sh (the chunked default after session 33's fixes; tune-kernels with the head; the
# quantized head on that table). Pass LIMIT=.
source bench/results/device_env.sh || exit 3
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader); echo "$GPU"
case "$GPU" in
*H200*)
  timeout 110 python3 bench/torch_bench.py --device cuda --shape llama3-8b --sections bf16,int4 --batch 1 --quant-lm-head --single-step-peer 0 --new-tokens 128 --out $OUT/head.json > $OUT/head.log 2>&1
  echo "quantized head rc $? at ${SECONDS}s"; python3 bench/results/table_summary.py $OUT/head.json 2>&1 | tail -4
  mkdir -p $OUT/table; OUT=$OUT/table LIMIT=$((${LIMIT:-590} - SECONDS)) bash bench/results/h200-s31-call2.sh
  ;;
*) LIMIT=$((${LIMIT:-590} - SECONDS)) bash bench/results/s33-next-h100.sh ;;
esac
