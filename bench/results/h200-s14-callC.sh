# Session 14 lead call C: why the mixed workload's first timed pass prefills at half speed (call B: 173 ms for the first
# 3,871-token prefill; session 7: 88 ms when the policy ran second in the process): the default policy three times
# in one process, torch.compile's recompiles logged.
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 3
echo "main $(cat .devq/commit)"
TORCH_LOGS=recompiles timeout $((590 - SECONDS)) python3 bench/torch_bench.py --device cuda --shape llama3-8b --sections copy,mixed --batch 1,32 --mixed-peer none --mixed-policies default,default,default --out $OUT/mixed.json > $OUT/mixed.log 2>&1
echo "bench rc $? at ${SECONDS}s"; grep -E "^\[|mixed |ecompil|rror" $OUT/mixed.log | cut -c1-400 | head -60
