# Session 30, call A2 (an H100, with call A's tune-kernels table in /tmp/lfc, copied from .devq on a fresh machine): call A's specwide
# stopped at a prefill of 16 rows, which the plan from a table of rows 1 and 8 sent to the MMA kernel (fixed:
# linear._bounded_tail). Again: specwide k = 4 with fused_decode mma, rounds chained off / on, on that table; the
# default runtime alone at batch 1; int4 g128 against bf16 at batch 1 and 8 with that table. LIMIT= as call A.
source bench/results/device_env.sh || exit 3
nvidia-smi --query-gpu=name --format=csv,noheader
export LORAFAST_CACHE=/tmp/lfc
# a fresh machine: call A's table, carried in .devq (bench/results/s30A/int4_h100_80gb_hbm3.json)
mkdir -p /tmp/lfc/kernels && cp -n .devq/int4_h100_80gb_hbm3.json /tmp/lfc/kernels/ && ls /tmp/lfc/kernels/ || exit 4
timeout 200 python3 bench/torch_bench.py --device cuda --shape llama3-8b --sections copy,specwide --fused-decode mma --spec-k 4 --overlap-rounds ab --new-tokens 128 --spec-repeats 2 --out $OUT/specA2.json > $OUT/specA2.log 2>&1
echo "specwide rc $? at ${SECONDS}s"; grep -E "specwide k|alone:|copy:|rror" $OUT/specA2.log | cut -c1-400
timeout $((${LIMIT:-590} - 5 - SECONDS)) python3 bench/torch_bench.py --device cuda --shape llama3-8b --sections bf16,int4 --batch 1,8 --single-step-peer 0 --new-tokens 128 --out $OUT/decodeA2.json > $OUT/decodeA2.log 2>&1
echo "decode rc $? at ${SECONDS}s"; grep -E "^\[|rror" $OUT/decodeA2.log | cut -c1-400 | tail -6
(cd $OUT && tar czf /tmp/call.tgz . && rm -rf ./* && mv /tmp/call.tgz .)
