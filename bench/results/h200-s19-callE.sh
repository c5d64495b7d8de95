# Session 19 call E: issue 15's table in one process on the final code (call D's int4 table shipped; spec and
# specdemo left out: unchanged since call C), then the per-kernel profile of decode steps at batch 1.
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl 2>/dev/null && export PYTHONPATH=/tmp/site:$PWD || exit 3
echo "main $(cat .devq/commit)"
timeout 300 python3 bench/torch_bench.py --device cuda --shape llama3-8b --sections copy,bf16,int4,mixed,e2e --batch 1,32 --single-step-peer 0 --mixed-peer none --mixed-policies default --e2e-repeats 5 --out $OUT/table.json > $OUT/table.log 2>&1
echo "table rc $? at ${SECONDS}s"; grep -E "^\[|mixed (first|default)|e2e|rror" $OUT/table.log | cut -c1-300
timeout $((480 - SECONDS)) python3 bench/torch_bench.py --device cuda --shape llama3-8b --sections profile --batch 1 --single-step-peer 0 --out $OUT/profile.json > $OUT/profile.log 2>&1
echo "profile rc $? at ${SECONDS}s"; tail -c 3000 $OUT/profile.log
