# Session 17 lead call C: the speculation governor with its best-case bound and cost floor (plain steps timed first)
# on the GPU: its CUDA test (a paused draft compiles nothing after warm-up), the spec (8B random, int4 draft) and
# specdemo (trained demo, int4 draft) sections with k4 `always` and `auto`; then, in a fresh process, the mixed
# workload's first pass with only the engine's prefills profiled, at batch buckets 1 and 32 (call B's profile ran
# with --batch 1, i.e. max_batch 1: one prompt per prefill, not the workload's packed prefills).
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 3
echo "main $(cat .devq/commit)"
timeout 80 python3 -m pytest -q -p no:cacheprovider tests/runtime/test_warm_up_cuda.py -k paused > $OUT/cuda_tests.txt 2>&1
echo "cuda test rc $? at ${SECONDS}s" | tee -a $OUT/cuda_tests.txt; grep -E "passed|failed|Error" $OUT/cuda_tests.txt | tail -3
timeout 150 python3 bench/torch_bench.py --device cuda --shape llama3-8b --sections spec,specdemo --spec-k 4 --out $OUT/spec.json > $OUT/spec.log 2>&1
echo "spec rc $? at ${SECONDS}s"; grep -E "spec(demo)? k|rror" $OUT/spec.log | cut -c1-330
timeout $((330 - SECONDS)) python3 bench/torch_bench.py --device cuda --shape llama3-8b --sections mixed --batch 1,32 --single-step-peer 0 --mixed-peer none --mixed-policies default --first-pass-profile 2 --out $OUT/mixed_prefill_profile.json > $OUT/mixed_prefill_profile.log 2>&1
echo "mixed profile rc $? at ${SECONDS}s"; grep -E "mixed|_first_vs_again|scoped|rror" $OUT/mixed_prefill_profile.log | cut -c1-330
