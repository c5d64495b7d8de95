# Session 17 lead call B: the mixed workload's first pass with only the engine's prefills profiled
# (--first-pass-profile 2: torch.profiler + cProfile around each _prefill call; call A's whole-pass profile ran past
# its time at the 8B shape), then session 14 call B's table on the current defaults (fused_decode auto, speculation
# auto in the runtime; the spec sections' kK rows run `always`, the kK_auto rows the governor).
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 3
echo "main $(cat .devq/commit)"
timeout 170 python3 bench/torch_bench.py --device cuda --shape llama3-8b --sections mixed --batch 1 --single-step-peer 0 --mixed-peer none --mixed-policies default --first-pass-profile 2 --out $OUT/mixed_prefill_profile.json > $OUT/mixed_prefill_profile.log 2>&1
echo "mixed profile rc $? at ${SECONDS}s"; grep -E "mixed|_first_vs_again|scoped|rror" $OUT/mixed_prefill_profile.log | cut -c1-330
timeout $((575 - SECONDS)) python3 bench/torch_bench.py --device cuda --shape llama3-8b --sections copy,bf16,int4,mixed,e2e,spec,specdemo --batch 1,32 --single-step-peer 0 --mixed-peer none --mixed-policies default --e2e-repeats 5 --out $OUT/table.json > $OUT/table.log 2>&1
echo "table rc $? at ${SECONDS}s"; grep -E "^\[|mixed|k[0-9]|e2e|rror" $OUT/table.log | cut -c1-420
