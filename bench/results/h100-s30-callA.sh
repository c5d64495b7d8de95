# Session 30, call A (an H100: no H200 came). (1) The speculative runtime's CUDA tests, whose device-side round inputs
# and overlap_rounds have not yet run on a GPU. (2) The first int4 kernel table for the H100 at rows 1 and 8 (the CUDA
# MMA kernel and the Triton GEMV swept) and the fused int4 ops at one row merged into it: without a table the H100's
# int4 draft runs tinygemm and unfused norms. (3) specwide (the trained demo widened to 8B, int4 g128 draft) at k = 4
# with fused_decode mma, rounds chained on the device off against on, with that table; (4) the default runtime alone
# at batch 1 (bf16, fused_decode auto: the FMA kernels), the comparator of issue 15's 1.6x line, in the same call.
# Pass LIMIT= the seconds the call may run (580: one call).
source bench/results/device_env.sh || exit 3
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 100 python3 -m pytest -q -rs -p no:cacheprovider tests/runtime/test_triton_fused.py -k "speculative or verify or auto_mma" > $OUT/cuda_tests.txt 2>&1
echo "fused draft tests rc $? at ${SECONDS}s"; tail -2 $OUT/cuda_tests.txt
T=lorafast_export/data/kernels/int4_h100_80gb_hbm3.json
timeout 160 python3 bench/int4_kernels.py --shapes llama3-8b --rows 1,8 --sweep mma,gemv --budget-s 110 --out $T > $OUT/int4_kernels.log 2>&1
echo "int4_kernels rc $? at ${SECONDS}s"; grep -v "^ *$" $OUT/int4_kernels.log | cut -c1-300 | tail -8; cp $T $OUT/ 2>/dev/null
timeout 80 python3 bench/mma_fused_bench.py --rows 1 --merge-into $T --out $OUT/fused_int4.json > $OUT/fused_int4.log 2>&1
echo "fused int4 rc $? at ${SECONDS}s"; tail -3 $OUT/fused_int4.log | cut -c1-300; cp $T $OUT/ 2>/dev/null
timeout $((${LIMIT:-590} - 75 - SECONDS)) python3 bench/torch_bench.py --device cuda --shape llama3-8b --sections copy,specwide --fused-decode mma --spec-k 4 --overlap-rounds ab --new-tokens 128 --spec-repeats 2 --out $OUT/specA.json > $OUT/specA.log 2>&1
echo "specwide rc $? at ${SECONDS}s"; grep -E "specwide k|alone:|copy:|rror" $OUT/specA.log | cut -c1-400
timeout $((${LIMIT:-590} - 5 - SECONDS)) python3 bench/torch_bench.py --device cuda --shape llama3-8b --sections bf16 --batch 1 --single-step-peer 0 --new-tokens 128 --out $OUT/bf16A.json > $OUT/bf16A.log 2>&1
echo "bf16 default rc $? at ${SECONDS}s"; grep -E "^\[|tok/s|rror" $OUT/bf16A.log | cut -c1-300 | tail -4
(cd $OUT && tar czf /tmp/call.tgz . && rm -rf ./* && mv /tmp/call.tgz .)
