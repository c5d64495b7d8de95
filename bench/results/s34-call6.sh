# Session 34, call 6 (the budget's last ~3 minutes): the final W8A8 code's CUDA tests (64-bit offsets forced, the
# rewritten layer test), then the int8 weight-only kernels against bf16 on this GPU (torch_bench int8k: an int8
# table for the H100, which has none) as far as the time allows. Pass LIMIT=.
source bench/results/device_env.sh || exit 3
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 60 python3 -m pytest -q -p no:cacheprovider tests/runtime/test_triton_w8a8.py > $OUT/cuda_tests.txt 2>&1
echo "W8A8 CUDA tests rc $? at ${SECONDS}s"; tail -2 $OUT/cuda_tests.txt
timeout $((${LIMIT:-170} - 5 - SECONDS)) python3 bench/torch_bench.py --device cuda --shape llama3-8b --sections int8k --int8-table $OUT/int8_h100.json --out $OUT/int8k.json > $OUT/int8k.log 2>&1
echo "int8k rc $? at ${SECONDS}s"; grep -c "int8k {" $OUT/int8k.log
(cd $OUT && tar czf /tmp/call.tgz . && rm -rf ./* && mv /tmp/call.tgz .)
