# Suggested first device call of the next session (written in session 18, not run): split the first probe's cost
# on a served queue with a draft that does not pay (session 18 call F: 0.67x on the first pass, 0.88 s more wall,
# 0.42 s of it in decode steps and rounds);
# then the table in one process (as session 18 call D) if the runtime changed.
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 3
echo "main $(cat .devq/commit)"
timeout 200 python3 bench/torch_bench.py --device cuda --shape llama3-8b --sections mixed,specmixed --batch 1,32 --single-step-peer 0 --mixed-peer none --mixed-policies default --out $OUT/specmixed.json > $OUT/specmixed.log 2>&1
echo "specmixed rc $? at ${SECONDS}s"; grep -E "mixed (first|default)|specmixed (first|again)|rror" $OUT/specmixed.log | cut -c1-330
timeout $((580 - SECONDS)) python3 bench/torch_bench.py --device cuda --shape llama3-8b --sections copy,bf16,int4,mixed,e2e,spec,specdemo --batch 1,32 --single-step-peer 0 --mixed-peer none --mixed-policies default --e2e-repeats 5 --out $OUT/table.json > $OUT/table.log 2>&1
echo "table rc $? at ${SECONDS}s"; grep -E "^\[|mixed (first|default)|k[0-9]|e2e|rror" $OUT/table.log | cut -c1-300
