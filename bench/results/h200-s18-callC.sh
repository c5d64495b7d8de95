# Session 18 call C: Engine.warm_up now also runs one layer's linears at every prefill row count up to 64 and every
# 8th up to the prefill budget (cuBLAS's per-row-count kernels, loaded lazily). The mixed workload's first pass in
# two fresh processes (lazy module loading, the default), to see whether it now matches a repeat.
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 3
echo "main $(cat .devq/commit)"
for i in 1 2; do
timeout 150 python3 bench/torch_bench.py --device cuda --shape llama3-8b --sections mixed --batch 1,32 --single-step-peer 0 --mixed-peer none --mixed-policies default --out $OUT/mixed_$i.json > $OUT/mixed_$i.log 2>&1
echo "mixed $i rc $? at ${SECONDS}s"; grep -E "mixed (first|default)|rror" $OUT/mixed_$i.log | cut -c1-330
python3 -c "import json,sys; p=json.load(open(sys.argv[1]))['mixed']['policies']; [print(k, p[k].get('runtime_warm_up_s'), p[k]['ttft_ms_median'], p[k]['prefills']) for k in ('first_pass','default')]" $OUT/mixed_$i.json
done
