# Session 35, call 2: int8 weight-only on the card at hand. (1) The int8 CUDA tests (the DEQUANT kind, its bf16
# rounding bit for bit); (2) torch_bench int8k at 1, 32, 128 and 1,024 rows, Triton tiles and DEQUANT against
# bf16, written as this card's int8 table into LORAFAST_CACHE (where the runtime reads a tuned table first) and
# $OUT; (3) with that table, bf16 against an int8 weight-only 8B model (`--quant int8`: per channel, symmetric)
# at batch 1, 8, 32, one process (decode tok/s, time to first token). Pass LIMIT=.
source bench/results/device_env.sh || exit 3
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader); echo "$GPU"
export LORAFAST_CACHE=/tmp/lc35; mkdir -p $LORAFAST_CACHE/kernels
SLUG=$(python3 -c "import sys; sys.path.insert(0,'.'); from lorafast_export.runtime.int4_table import gpu_slug; print(gpu_slug('$GPU'))")
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/runtime/test_triton_int8.py > $OUT/cuda_tests.txt 2>&1
echo "int8 CUDA tests rc $? at ${SECONDS}s"; tail -2 $OUT/cuda_tests.txt
timeout 200 python3 bench/torch_bench.py --device cuda --shape llama3-8b --sections int8k --int8-table $LORAFAST_CACHE/kernels/int8_$SLUG.json --out $OUT/int8k.json > $OUT/int8k.log 2>&1
echo "int8k rc $? at ${SECONDS}s"; cp $LORAFAST_CACHE/kernels/int8_$SLUG.json $OUT/
python3 -c "
import json,sys; sys.path.insert(0,'.')
from lorafast_export.runtime.int4_table import int8_plan_from_table
t=json.load(open('$OUT/int8_$SLUG.json'))
for r in t['shapes']:
    print(r['n'], r['k'], {b: (round(c['bf16_us'],1), round(c['us'],1), c['entry'][1]) for b, c in r['rows'].items()}, int8_plan_from_table(t, r['n'], r['k']))
"
timeout $((${LIMIT:-590} - 10 - SECONDS)) python3 bench/torch_bench.py --device cuda --shape llama3-8b --sections copy,bf16,int8 --batch 1,8,32 --single-step-peer 0 --new-tokens 128 --out $OUT/e2e.json > $OUT/e2e.log 2>&1
echo "e2e rc $? at ${SECONDS}s"; grep -iE "error|Traceback" $OUT/e2e.log | head -5
python3 bench/results/w8a8_summary.py $OUT/e2e.json
(cd $OUT && tar czf /tmp/call.tgz . && rm -rf ./* && mv /tmp/call.tgz .)
