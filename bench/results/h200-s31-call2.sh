# Session 31, call 2 (an H200): issue 15's table on this session's main in one process, as session 24's call C
# (every later device call ran on an H100): copy, bf16 and int4 at batch 1 and 32, the mixed 32-request workload's
# first pass, end to end against transformers' static cache + compile (5 pairs). Pass LIMIT= the seconds it may run.
source bench/results/device_env.sh || exit 3
nvidia-smi --query-gpu=name --format=csv,noheader
timeout $((${LIMIT:-590} - 10 - SECONDS)) python3 bench/torch_bench.py --device cuda --shape llama3-8b --sections copy,bf16,int4,mixed,e2e --batch 1,32 --single-step-peer 0 --mixed-peer none --mixed-policies default --e2e-repeats 5 --out $OUT/table.json > $OUT/table.log 2>&1
echo "table rc $? at ${SECONDS}s"; grep -E "^\[|mixed (first|default)|copy:" $OUT/table.log | cut -c1-200
python3 bench/results/table_summary.py $OUT/table.json 2>&1 | tail -12
(cd $OUT && tar czf /tmp/call.tgz . && rm -rf ./* && mv /tmp/call.tgz .)
