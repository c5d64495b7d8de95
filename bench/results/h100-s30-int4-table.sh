# For a session with an H100 (kind nvidia-h100-x1): the first int4 kernel table for the H100, whose runtime (and
# speculative draft) runs tinygemm and unfused norms without one (bench/TORCH.md, session 29). (1) bench/int4_kernels.py
# over the 8B shapes at rows 1, 2, 4, 8 and 32 (the CUDA MMA kernel and the Triton GEMV swept, the rest at their
# defaults; a budget cut drops the last buckets: re-run with --rows of what is missing and --merge-into the file).
# (2) bench/mma_fused_bench.py's fused int4 ops at one row, merged into the same file. (3) int4 decode at batch 1 and
# 8 with that table against bf16, same process. Copy $OUT/int4_h100_80gb_hbm3.json to lorafast_export/data/kernels/
# if it wins. Pass LIMIT= the seconds the call may run.
source bench/results/device_env.sh || exit 3
nvidia-smi --query-gpu=name --format=csv,noheader
T=lorafast_export/data/kernels/int4_h100_80gb_hbm3.json
timeout 330 python3 bench/int4_kernels.py --shapes llama3-8b --rows 1,8,2,4,32 --sweep mma,gemv --budget-s 300 --out $T > $OUT/int4_kernels.log 2>&1
echo "int4_kernels rc $? at ${SECONDS}s"; grep -v "^ *$" $OUT/int4_kernels.log | cut -c1-300 | tail -12; cp $T $OUT/ 2>/dev/null
timeout 90 python3 bench/mma_fused_bench.py --rows 1 --merge-into $T --out $OUT/fused_int4.json > $OUT/fused_int4.log 2>&1
echo "fused int4 rc $? at ${SECONDS}s"; cp $T $OUT/ 2>/dev/null
timeout $((${LIMIT:-590} - 10 - SECONDS)) python3 bench/torch_bench.py --device cuda --shape llama3-8b --sections copy,bf16,int4 --batch 1,8 --single-step-peer 0 --new-tokens 128 --out $OUT/decode.json > $OUT/decode.log 2>&1
echo "decode rc $? at ${SECONDS}s"; grep -E "^\[|tok/s|rror" $OUT/decode.log | cut -c1-300 | tail -12
(cd $OUT && tar czf /tmp/call.tgz . && rm -rf ./* && mv /tmp/call.tgz .)
