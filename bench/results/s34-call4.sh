# Session 34, call 4: the Triton W8A8 GEMM (runtime/triton_w8a8.py): its CUDA tests, tiles and the row count
# from which W8A8Linear runs it (bench/results/s34_w8a8_tiles.py), then with that choice the check model and
# bf16 against a SmoothQuant 8B model at batch 1, 8, 32 (TTFT: the prefill), one process. Pass LIMIT=.
source bench/results/device_env.sh || exit 3
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/runtime/test_triton_w8a8.py tests/runtime/test_linear.py -k w8a8 > $OUT/cuda_tests.txt 2>&1
echo "w8a8 CUDA tests rc $? at ${SECONDS}s"; tail -2 $OUT/cuda_tests.txt
timeout $((${LIMIT:-590} - 15 - SECONDS)) python3 bench/results/s34_w8a8_tiles.py $OUT/tiles.json -- --device cuda --shape llama3-8b --sections w8a8check,copy,bf16,w8a8 --batch 1,8,32 --single-step-peer 0 --new-tokens 128 --out $OUT/e2e.json > $OUT/tiles.log 2>&1
echo "tiles + e2e rc $? at ${SECONDS}s"; grep -E "^bucket|^best|^end to end" $OUT/tiles.log; grep -iE "error|Traceback" $OUT/tiles.log | head -5
python3 -c "
import json,sys
for r in json.load(open('$OUT/tiles.json'))['rows']:
    t=min(v for v in r['triton_configs'].values() if isinstance(v,float))
    print(r['linear'], r['rows'], 'bf16', round(r['bf16'],1), 'cublas', round(r['cublas'],1), 'triton_rule', round(r['triton_rule'],1), 'best triton', round(t,1))
"
python3 bench/results/w8a8_summary.py $OUT/e2e.json
python3 -c "
import json; d=json.load(open('$OUT/e2e.json'))
for k in ('bf16','w8a8'):
  for r in d[k]['results']: print(k, r['batch'], 'ttft med', round(r['ttft_ms_median'],1), 'prefill tok/s', round(r['prefill_tokens_per_s']))
"
(cd $OUT && tar czf /tmp/call.tgz . && rm -rf ./* && mv /tmp/call.tgz .)
