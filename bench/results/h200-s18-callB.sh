# Session 18 call B: the mixed workload's first pass still costs ~15 ms more than a repeat in its first packed prefill
# (call A: 106.4 against 91.5 ms; TTFT median 107.2 against 91.9) after the head warm-up. Find what: the prefills
# profiled (first pass against a repeat), then a fresh process with CUDA_MODULE_LOADING=EAGER (are lazily loaded
# cuBLAS / CUDA modules the rest?).
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 3
echo "main $(cat .devq/commit)"
timeout 200 python3 bench/torch_bench.py --device cuda --shape llama3-8b --sections mixed --batch 1,32 --single-step-peer 0 --mixed-peer none --mixed-policies default --first-pass-profile 2 --out $OUT/mixed_prefill_profile.json > $OUT/mixed_prefill_profile.log 2>&1
echo "mixed profile rc $? at ${SECONDS}s"; grep -E "mixed|_first_vs_again|scoped|rror" $OUT/mixed_prefill_profile.log | cut -c1-330
CUDA_MODULE_LOADING=EAGER timeout 150 python3 bench/torch_bench.py --device cuda --shape llama3-8b --sections mixed --batch 1,32 --single-step-peer 0 --mixed-peer none --mixed-policies default --out $OUT/mixed_eager.json > $OUT/mixed_eager.log 2>&1
echo "mixed eager-loading rc $? at ${SECONDS}s"; grep -E "mixed|rror" $OUT/mixed_eager.log | cut -c1-330
