# Session 36, call 1. (1) Session 35's final W8A8 form on the GPU: the W8A8 and int8 CUDA tests, w8a8k at 1, 16
# and 24 rows. (2) The torch-compile target's int8 lm_head: torch_bench int8k on the head shape [128256, 4096]
# merged into this card's shipped int8 table (the working copy's package data, which the next process reads).
# (3) One process, 8B, batch 1, 8, 32: bf16; int4 g128 with the head bf16 and int8; W8A8 and W8A8 with the head
# int8; int8 weight-only with the head int8 (decode tok/s, first token; batch 8's prefill, 52 ms in s35 call 7).
# Pass LIMIT=.
source bench/results/device_env.sh || exit 3
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader); echo "$GPU"
SLUG=$(python3 -c "import sys; sys.path.insert(0,'.'); from lorafast_export.runtime.int4_table import gpu_slug; print(gpu_slug('$GPU'))")
TABLE=lorafast_export/data/kernels/int8_$SLUG.json
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/runtime/test_triton_w8a8.py tests/runtime/test_triton_int8.py tests/runtime/test_linear.py -k "w8a8 or gemv or tiles or wide or int8" > $OUT/cuda_tests.txt 2>&1
echo "CUDA tests rc $? at ${SECONDS}s"; tail -2 $OUT/cuda_tests.txt; grep -E "^FAILED|Error" $OUT/cuda_tests.txt | head -5
timeout 100 python3 bench/torch_bench.py --device cuda --shape llama3-8b --sections w8a8k --w8a8-rows 1,16,24 --out $OUT/w8a8k.json > $OUT/w8a8k.log 2>&1
echo "w8a8k rc $? at ${SECONDS}s"; python3 bench/results/w8a8_summary.py $OUT/w8a8k.json | grep -v before
timeout 150 python3 bench/torch_bench.py --device cuda --shape llama3-8b --sections int8k --int8-shapes head --int8-table $TABLE --out $OUT/int8k_head.json > $OUT/int8k_head.log 2>&1
echo "int8k head rc $? at ${SECONDS}s"; cp $TABLE $OUT/
python3 -c "
import json,sys; sys.path.insert(0,'.')
from lorafast_export.runtime.int4_table import int8_plan_from_table
t=json.load(open('$TABLE'))
for r in t['shapes']:
    print(r['n'], r['k'], {b: (round(c['bf16_us'],1), round(c['us'],1), c['entry'][1]) for b, c in r['rows'].items()}, int8_plan_from_table(t, r['n'], r['k']))
"
timeout $((${LIMIT:-590} - 10 - SECONDS)) python3 bench/torch_bench.py --device cuda --shape llama3-8b --sections w8a8check,copy,bf16,int4,int4h8,w8a8,w8a8h8,int8h8 --batch 1,8,32 --single-step-peer 0 --new-tokens 128 --budget-s $((${LIMIT:-590} - 60 - SECONDS)) --out $OUT/e2e.json > $OUT/e2e.log 2>&1
echo "e2e rc $? at ${SECONDS}s"; grep -iE "error|Traceback" $OUT/e2e.log | head -5; grep -o "^\[ *[0-9.]*s\] [a-z0-9]*" $OUT/e2e.log
python3 bench/results/w8a8_summary.py $OUT/e2e.json
(cd $OUT && tar czf /tmp/call.tgz . && rm -rf ./* && mv /tmp/call.tgz .)
