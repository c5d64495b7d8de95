# Session 15 lead call D: why the mixed workload's first pass is slow with nothing left to compile. SDPA's first
# call on new shapes under PyTorch's backend choice vs flash / efficient only, then the mixed workload (first pass
# after the load-time warm-up) with each, in fresh processes.
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 3
echo "main $(cat .devq/commit)"
timeout 60 python3 bench/sdpa_first_call.py > $OUT/sdpa_first_call.log 2>&1; echo "sdpa rc $? at ${SECONDS}s"; grep "^|" $OUT/sdpa_first_call.log; grep -o '"set": "[a-z-]*", "b": 19.*' $OUT/sdpa_first_call.log | cut -c1-400
timeout 90 python3 -m pytest -q -p no:cacheprovider tests/runtime/test_triton_fused_int4.py -k bench_dry_run > $OUT/cuda_test_bench.txt 2>&1; echo "bench test rc $? at ${SECONDS}s"
for mode in torch no-cudnn; do
TORCH_LOGS=recompiles timeout 200 python3 bench/torch_bench.py --device cuda --shape llama3-8b --sections copy,mixed --batch 1,32 --single-step-peer 0 --mixed-peer none --mixed-policies default --prefill-sdpa $mode --out $OUT/mixed_$mode.json > $OUT/mixed_$mode.log 2>&1
echo "mixed $mode rc $? at ${SECONDS}s"; grep -E "mixed (first|default)|rror" $OUT/mixed_$mode.log | cut -c1-300
done
