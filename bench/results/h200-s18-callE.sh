# Session 18 call E: with speculation "auto" the draft is prefilled on demand (call D: with a paused draft the 8B
# spec row's time to first token was 43.5 ms against 6.1 alone: the int4 draft's prefill at admission). The CUDA
# warm-up tests (a paused draft compiles nothing after warm-up), spec and specdemo at k 4, and one more mixed first
# pass in a fresh process (the prefill GEMM warm-up).
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 3
echo "main $(cat .devq/commit)"
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/runtime/test_warm_up_cuda.py > $OUT/cuda_tests.txt 2>&1
echo "cuda tests rc $? at ${SECONDS}s" | tee -a $OUT/cuda_tests.txt; grep -E "passed|failed|Error" $OUT/cuda_tests.txt | tail -3
timeout 170 python3 bench/torch_bench.py --device cuda --shape llama3-8b --sections spec,specdemo --spec-k 4 --out $OUT/spec.json > $OUT/spec.log 2>&1
echo "spec rc $? at ${SECONDS}s"; grep -E "spec(demo)? k|rror" $OUT/spec.log | cut -c1-330
python3 -c "
import json,sys
d=json.load(open(sys.argv[1]))
for s in ('spec','specdemo'):
    for k,v in d.get(s,{}).items():
        if isinstance(v,dict) and 'ttft_ms_first' in v: print(s,k,'ttft',round(v['ttft_ms_first'],2),'wall',round(v['wall_s'],4),'decode',round(v['decode_tokens_per_s'],1))
" $OUT/spec.json
timeout $((440 - SECONDS)) python3 bench/torch_bench.py --device cuda --shape llama3-8b --sections mixed --batch 1,32 --single-step-peer 0 --mixed-peer none --mixed-policies default --out $OUT/mixed.json > $OUT/mixed.log 2>&1
echo "mixed rc $? at ${SECONDS}s"; grep -E "mixed (first|default)|rror" $OUT/mixed.log | cut -c1-330
