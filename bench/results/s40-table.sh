# Session 40: issue 15's table in one process on this card, with attention.decode_plan (session 39's fitted
# plan): copy, bf16, int4 g128 with the int8 head at batch 1 and 32, torch.profiler's breakdown of a decode step
# of both at batch 1, the mixed 32-request workload, end to end against transformers' static cache + compile
# (5 pairs). Pass LIMIT=.
source bench/results/device_env.sh || exit 3
LIMIT=${LIMIT:-590}
nvidia-smi --query-gpu=name --format=csv,noheader
timeout $((LIMIT - 10 - SECONDS)) python3 bench/torch_bench.py --device cuda --shape llama3-8b --sections copy,bf16,int4h8,profile,mixed,e2e --profile bf16,int4h8 --batch 1,32 --single-step-peer 0 --mixed-peer none --mixed-policies default --e2e-repeats 5 --out $OUT/table.json > $OUT/table.log 2>&1
echo "table rc $? at ${SECONDS}s"; grep -iE "error|Traceback" $OUT/table.log | head -3 | cut -c1-300; grep -E "^\[|mixed (first|default)|copy:" $OUT/table.log | cut -c1-200
python3 bench/results/table_summary.py $OUT/table.json 2>&1 | tail -12
python3 bench/results/profile_summary.py $OUT/table.json
(cd $OUT && tar czf /tmp/call.tgz . && rm -rf ./* && mv /tmp/call.tgz .)
