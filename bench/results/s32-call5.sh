# Session 32, call 5 (an H100 with its table removed, as any GPU we ship no table for): int4 g128 decode at batch 1, 8
# and 32 on this session's untabled rule (GEMM_W at every row count, tiles by int4_table.untabled_plan) against the
# code before it (main 45f0959, carried in .devq/old: tinygemm at every row count), bf16 in the same process as the
# new code's run. Pass LIMIT= the seconds it may run.
source bench/results/device_env.sh || exit 3
nvidia-smi --query-gpu=name --format=csv,noheader
rm -f lorafast_export/data/kernels/int4_h100_80gb_hbm3.json .devq/old/lorafast_export/data/kernels/int4_h100_80gb_hbm3.json
export LORAFAST_CACHE=/tmp/lfc-untabled; rm -rf $LORAFAST_CACHE
timeout 200 python3 bench/torch_bench.py --device cuda --shape llama3-8b --sections copy,bf16,int4 --batch 1,8,32 --single-step-peer 0 --new-tokens 128 --out $OUT/untabled_new.json > $OUT/untabled_new.log 2>&1
echo "new rc $? at ${SECONDS}s"; python3 bench/results/table_summary.py $OUT/untabled_new.json 2>&1 | tail -8; grep -m2 "tune-kernels" $OUT/untabled_new.log | cut -c1-300
timeout $((${LIMIT:-590} - 10 - SECONDS)) python3 .devq/old/bench/torch_bench.py --device cuda --shape llama3-8b --sections int4 --batch 1,8,32 --single-step-peer 0 --new-tokens 128 --out $OUT/untabled_old.json > $OUT/untabled_old.log 2>&1
echo "old rc $? at ${SECONDS}s"; python3 bench/results/table_summary.py $OUT/untabled_old.json 2>&1 | tail -5; grep -m2 "tune-kernels" $OUT/untabled_old.log | cut -c1-300
(cd $OUT && tar czf /tmp/call.tgz . && rm -rf ./* && mv /tmp/call.tgz .)
