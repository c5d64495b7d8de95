# Session 28 call 3: the dense fused decode ops on the tensor cores (runtime option fused_decode=mma;
# runtime/triton_fused.py's _mma_partial_kernel + _mma_finish_kernel). (1) Their CUDA tests (every op against float64,
# row i of a 6-row call against the 1-row call bit for bit, the runtime's greedy tokens with and without a draft).
# (2) bf16 at batch 1 and 4 (llama3-8b, random weights), fused_decode auto (the FMA kernels at 1 row, cuBLAS at 4)
# against mma, interleaved twice. (3) specwide (the 8B-wide trained demo, int4 g128 draft, k = 2 and 4) with mma:
# the verify's rows at about one row's cost; each `always` row profiled.
source bench/results/device_env.sh || exit 3
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 150 python3 -m pytest -q -rs -p no:cacheprovider tests/runtime/test_triton_fused.py > $OUT/cuda_tests.txt 2>&1
echo "fused tests rc $? at ${SECONDS}s"; tail -2 $OUT/cuda_tests.txt
for i in 1 2; do
  for v in auto mma; do
    [ $SECONDS -lt 330 ] || break 2
    timeout 150 python3 bench/torch_bench.py --device cuda --shape llama3-8b --sections copy,bf16 --batch 1,4 --eager-peer 0 --fused-decode $v --out $OUT/ab-$v-$i.json > $OUT/ab-$v-$i.log 2>&1
    echo "$v $i rc $? at ${SECONDS}s"; python3 bench/results/decode_rows.py $OUT/ab-$v-$i.json
  done
done
[ $((${LIMIT:-590} - SECONDS)) -gt 90 ] && timeout $((${LIMIT:-590} - 10 - SECONDS)) python3 bench/torch_bench.py --device cuda --shape llama3-8b --sections specwide --spec-k 2,4 --new-tokens 128 --spec-repeats 1 --spec-profile on --fused-decode mma --out $OUT/specmma.json > $OUT/specmma.log 2>&1
echo "specwide mma rc $? at ${SECONDS}s"; grep -E "profile:|specwide k|alone:" $OUT/specmma.log | cut -c1-260
(cd $OUT && tar czf /tmp/call.tgz . && rm -rf ./* && mv /tmp/call.tgz .)
