# Written in session 34 for the next session's first device call (~590 s; a start costs 30-180 s more):
# (1) on any card, the int8 weight-only kernels against bf16 at 1, 32 and now 1,024 rows (torch_bench int8k, the
#     prefill bucket added in session 34), writing the int8 table this card would ship (the H100 has none; the H200's
#     was measured to 32 rows only); (2) on an H200, int4 with the quantized head at batch 1 and issue 15's table
#     (s34-call1.sh's H200 branch; no H200 call since session 24); on an H100, the W8A8 CUDA tests. Pass LIMIT=.
source bench/results/device_env.sh || exit 3
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader); echo "$GPU"
timeout 150 python3 bench/torch_bench.py --device cuda --shape llama3-8b --sections int8k --int8-table $OUT/int8_table.json --out $OUT/int8k.json > $OUT/int8k.log 2>&1
echo "int8k rc $? at ${SECONDS}s"; python3 -c "
import json,sys; sys.path.insert(0,'.')
from lorafast_export.runtime.int4_table import int8_plan_from_table
t=json.load(open('$OUT/int8_table.json'))
for r in t['shapes']:
    print(r['n'], r['k'], {b: (round(c['bf16_us'],1), round(c['us'],1) if c.get('us') else None) for b, c in r['rows'].items()}, 'int8' if int8_plan_from_table(t, r['n'], r['k']) else 'dequant')
"
case "$GPU" in
*H200*)
  mkdir -p $OUT/h200; OUT=$OUT/h200 LIMIT=$((${LIMIT:-590} - SECONDS)) bash bench/results/s34-call1.sh ;;
*)
  timeout 100 python3 -m pytest -q -p no:cacheprovider tests/runtime/test_triton_w8a8.py tests/runtime/test_linear.py -k "w8a8 or tiles or wide" > $OUT/cuda_tests.txt 2>&1
  echo "W8A8 CUDA tests rc $? at ${SECONDS}s"; tail -2 $OUT/cuda_tests.txt ;;
esac
(cd $OUT && tar czf /tmp/call.tgz . && rm -rf ./* && mv /tmp/call.tgz .)
