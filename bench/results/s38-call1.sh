# Session 38, call 1, by card. H200 (issue 15's card; none came since session 24): the int8 table's head
# [128256, 4096] (torch_bench int8k, merged into the working copy's shipped table, which the next process reads),
# then issue 15's table in one process: copy, bf16, int4 g128 with the int8 head (the default now) at batch 1 and
# 32, torch.profiler's breakdown of a decode step of both at batch 1 and 32, the mixed 32-request workload, end to
# end against transformers' static cache + compile (5 pairs). Other cards: the profile of one batch-1 decode step of
# bf16 and of int4 g128 with the int8 head (under kernel_pdl a kernel's time includes its wait). Pass LIMIT=.
source bench/results/device_env.sh || exit 3
LIMIT=${LIMIT:-590}
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader); echo "$GPU"
SLUG=$(python3 -c "import sys; sys.path.insert(0,'.'); from lorafast_export.runtime.int4_table import gpu_slug; print(gpu_slug('$GPU'))")
TABLE=lorafast_export/data/kernels/int8_$SLUG.json
if [ "$SLUG" = h200 ]; then
  timeout 120 python3 bench/torch_bench.py --device cuda --shape llama3-8b --sections int8k --int8-shapes head --int8-table $TABLE --out $OUT/int8k_head.json > $OUT/int8k_head.log 2>&1
  echo "int8k head rc $? at ${SECONDS}s"; cp $TABLE $OUT/; cut -c1-240 $OUT/int8k_head.log | grep int8k
  timeout $((LIMIT - 10 - SECONDS)) python3 bench/torch_bench.py --device cuda --shape llama3-8b --sections copy,bf16,int4h8,profile,mixed,e2e --profile bf16,int4h8 --batch 1,32 --single-step-peer 0 --mixed-peer none --mixed-policies default --e2e-repeats 5 --out $OUT/table.json > $OUT/table.log 2>&1
  echo "table rc $? at ${SECONDS}s"; grep -iE "error|Traceback" $OUT/table.log | head -3 | cut -c1-300; grep -E "^\[|mixed (first|default)|copy:" $OUT/table.log | cut -c1-200
  python3 bench/results/table_summary.py $OUT/table.json 2>&1 | tail -12
  python3 bench/results/profile_summary.py $OUT/table.json
else
  timeout 200 python3 bench/torch_bench.py --device cuda --shape llama3-8b --sections copy,bf16,int4h8,profile --profile bf16,int4h8 --batch 1 --single-step-peer 0 --new-tokens 128 --out $OUT/profile.json > $OUT/profile.log 2>&1
  echo "profile rc $? at ${SECONDS}s"; python3 bench/results/table_summary.py $OUT/profile.json 2>&1 | grep -E "^(bf16|int4)"
  python3 bench/results/profile_summary.py $OUT/profile.json
fi
(cd $OUT && tar czf /tmp/call.tgz . && rm -rf ./* && mv /tmp/call.tgz .)
