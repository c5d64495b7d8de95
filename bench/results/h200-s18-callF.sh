# Session 18 call F: the draft prefilled on demand and packed (both policies). The CUDA warm-up tests (a paused
# draft compiles nothing after warm-up), then in one process the mixed queue without a draft and the same queue on
# a runtime loaded with the int4 draft under speculation auto (specmixed): what a draft that does not pay costs a
# served workload.
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 3
echo "main $(cat .devq/commit)"
timeout 100 python3 -m pytest -q -p no:cacheprovider tests/runtime/test_warm_up_cuda.py > $OUT/cuda_tests.txt 2>&1
echo "cuda tests rc $? at ${SECONDS}s" | tee -a $OUT/cuda_tests.txt; grep -E "passed|failed|Error" $OUT/cuda_tests.txt | tail -3
timeout $((390 - SECONDS)) python3 bench/torch_bench.py --device cuda --shape llama3-8b --sections mixed,specmixed --batch 1,32 --single-step-peer 0 --mixed-peer none --mixed-policies default --out $OUT/specmixed.json > $OUT/specmixed.log 2>&1
echo "specmixed rc $? at ${SECONDS}s"; grep -E "mixed (first|default)|specmixed (first|again)|rror" $OUT/specmixed.log | cut -c1-330
python3 -c "
import json,sys
d=json.load(open(sys.argv[1])).get('specmixed',{})
print({k: v for k, v in d.items() if k not in ('first_pass','again')})
for k in ('first_pass','again'):
    v=d.get(k,{}); print(k, {x: v.get(x) for x in ('ttft_ms_median','tokens_per_s','decode_tokens_per_s','spec_rounds','wall_s')})
" $OUT/specmixed.json
