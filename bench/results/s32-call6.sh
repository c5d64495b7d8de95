# Session 32, call 6 (the budget's last ~270 s; an H100 or H200 with its shipped table removed, as any GPU we ship no
# table for): int4 g128 against bf16 at batch 1 and 32 on the untabled rule (GEMM_W, int4_table.untabled_plan), then
# int4 at batch 32 on the code before it (main 45f0959 in .devq/old: tinygemm), 64 new tokens. LIMIT= as usual.
source bench/results/device_env.sh || exit 3
nvidia-smi --query-gpu=name --format=csv,noheader
rm -f lorafast_export/data/kernels/int4_*.json .devq/old/lorafast_export/data/kernels/int4_*.json
export LORAFAST_CACHE=/tmp/lfc-untabled; rm -rf $LORAFAST_CACHE
timeout $((${LIMIT:-100} * 6 / 10)) python3 bench/torch_bench.py --device cuda --shape llama3-8b --sections bf16,int4 --batch 1,32 --single-step-peer 0 --new-tokens 64 --out $OUT/untabled_new.json > $OUT/untabled_new.log 2>&1
echo "new rc $? at ${SECONDS}s"; python3 bench/results/table_summary.py $OUT/untabled_new.json 2>&1 | tail -6
timeout $((${LIMIT:-100} - 5 - SECONDS)) python3 .devq/old/bench/torch_bench.py --device cuda --shape llama3-8b --sections int4 --batch 32 --single-step-peer 0 --new-tokens 64 --out $OUT/untabled_old.json > $OUT/untabled_old.log 2>&1
echo "old rc $? at ${SECONDS}s"; python3 bench/results/table_summary.py $OUT/untabled_old.json 2>&1 | tail -3
(cd $OUT && tar czf /tmp/call.tgz . && rm -rf ./* && mv /tmp/call.tgz .)
