# Session 15 lead call E: the mixed workload's first pass after the warm-up also reserves the largest attention
# grid, with cudaMalloc calls counted per pass; then the same with CUDA_MODULE_LOADING=EAGER (lazy kernel loading).
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 3
echo "main $(cat .devq/commit)"
for loading in LAZY EAGER; do
CUDA_MODULE_LOADING=$loading timeout 140 python3 bench/torch_bench.py --device cuda --shape llama3-8b --sections mixed --batch 1,32 --single-step-peer 0 --mixed-peer none --mixed-policies default --out $OUT/mixed_$loading.json > $OUT/mixed_$loading.log 2>&1
echo "mixed $loading rc $? at ${SECONDS}s"; grep -E "mixed (first|default)|rror" $OUT/mixed_$loading.log | cut -c1-300
python3 -c "
import json,sys; p=json.load(open('$OUT/mixed_$loading.json'))['mixed']['policies']
for k in ('first_pass','default'): r=p[k]; print(k, r.get('runtime_warm_up_s'), r['ttft_ms_median'], r['prefills'], 'allocs', r.get('device_allocs'))
" 2>&1 | tail -3
done
