# Session 30, call B (an H100, after call A wrote int4_h100_80gb_hbm3.json at rows 1 and 8 with the fused int4 ops):
# (1) the table's other row buckets (2, 4, 32) merged into it; (2) int4 g128 decode with that table against bf16 at
# batch 1, 8 and 32 in the same process (the int4 batch-1 >= 2.5x and batch-32 >= 1.3x lines, on this card). Pass
# LIMIT= the seconds the call may run.
source bench/results/device_env.sh || exit 3
nvidia-smi --query-gpu=name --format=csv,noheader
T=lorafast_export/data/kernels/int4_h100_80gb_hbm3.json
timeout 230 python3 bench/int4_kernels.py --shapes llama3-8b --rows 2,4,32 --sweep mma,gemv --budget-s 180 --out $OUT/int4_rows.json --merge-into $T > $OUT/int4_kernels_B.log 2>&1
echo "int4_kernels rc $? at ${SECONDS}s"; grep -v "^ *$" $OUT/int4_kernels_B.log | cut -c1-300 | tail -6; cp $T $OUT/ 2>/dev/null
timeout $((${LIMIT:-590} - 10 - SECONDS)) python3 bench/torch_bench.py --device cuda --shape llama3-8b --sections copy,bf16,int4 --batch 1,8,32 --single-step-peer 0 --new-tokens 128 --out $OUT/decode.json > $OUT/decode.log 2>&1
echo "decode rc $? at ${SECONDS}s"; grep -E "^\[|tok/s|rror" $OUT/decode.log | cut -c1-300 | tail -12
(cd $OUT && tar czf /tmp/call.tgz . && rm -rf ./* && mv /tmp/call.tgz .)
