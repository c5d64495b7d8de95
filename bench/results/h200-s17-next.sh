# Suggested first device call of the next session (written in session 17, not run): the mixed workload's first
# pass after load in a fresh process, now that Engine.warm_up also runs the head at every row count (session 17
# found ~100 ms of the first pass in the head's first cuBLAS call per row count); then session 14's table
# (end to end against transformers' static cache + compile in the same call, the governor's kK_auto rows).
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 3
echo "main $(cat .devq/commit)"
timeout 150 python3 bench/torch_bench.py --device cuda --shape llama3-8b --sections mixed --batch 1,32 --single-step-peer 0 --mixed-peer none --mixed-policies default --out $OUT/mixed.json > $OUT/mixed.log 2>&1
echo "mixed rc $? at ${SECONDS}s"; grep -E "mixed|rror" $OUT/mixed.log | cut -c1-300
timeout $((575 - SECONDS)) python3 bench/torch_bench.py --device cuda --shape llama3-8b --sections copy,bf16,int4,mixed,e2e,spec,specdemo --batch 1,32 --single-step-peer 0 --mixed-peer none --mixed-policies default --e2e-repeats 5 --out $OUT/table.json > $OUT/table.log 2>&1
echo "table rc $? at ${SECONDS}s"; grep -E "^\[|mixed|k[0-9]|e2e|rror" $OUT/table.log | cut -c1-420
