# Session 38, call 3 (any card): the CUDA tests of the final-norm kernel (add_rms_norm), the rope table and the fused
# decode runtimes, then decode tok/s at batch 1 and 32 of bf16 and int4 g128 + int8 head with and without the two
# changes (bench/results/s38_without.py), alternated, one process each. Pass LIMIT=.
source bench/results/device_env.sh || exit 3
LIMIT=${LIMIT:-590}
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/runtime/test_triton_fused.py tests/runtime/test_model.py -k "add_rms_norm or norm_kernel or rope_table or runtime_with_fused or speculative_runtime or verify_rows or paged_decode" > $OUT/cuda_tests.txt 2>&1
echo "tests rc $? at ${SECONDS}s"; tail -3 $OUT/cuda_tests.txt
for i in 1 2; do
  for v in without with; do
    [ $((LIMIT - SECONDS)) -lt 70 ] && break 2
    if [ $v = with ]; then B=bench/torch_bench.py; else B=bench/results/s38_without.py; fi
    timeout $((LIMIT - 10 - SECONDS)) python3 $B --device cuda --shape llama3-8b --sections bf16,int4h8 --batch 1,32 --single-step-peer 0 --new-tokens 128 --out $OUT/${v}_$i.json > $OUT/${v}_$i.log 2>&1
    echo "$v $i rc $? at ${SECONDS}s"; python3 bench/results/table_summary.py $OUT/${v}_$i.json 2>&1 | grep -E "^(bf16|int4)"
  done
done
(cd $OUT && tar czf /tmp/call.tgz . && rm -rf ./* && mv /tmp/call.tgz .)
