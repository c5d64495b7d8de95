# Session 14 lead call A: the fused kernels' CUDA tests (the new add_norm_qkv_rope: rope and the k/v write in the qkv
# kernel), then the call-E order that faulted in session 13 (fused section, then e2e against transformers' compiled
# static cache) with GraphRunner capturing on its own stream; tiles swept; the 128 + 256 tokens.
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 3
echo "main $(cat .devq/commit)"
nvidia-smi --query-gpu=name,clocks.max.mem --format=csv,noheader
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/runtime/test_triton_fused.py > $OUT/cuda_tests_fused.txt 2>&1
echo "fused tests rc $? at ${SECONDS}s" | tee -a $OUT/cuda_tests_fused.txt; tail -3 $OUT/cuda_tests_fused.txt
timeout $((585 - SECONDS)) python3 bench/torch_bench.py --device cuda --shape llama3-8b --sections copy,fused,e2e --fused-decode on --fused-tiles sweep --fused-batches 1 --fused-e2e 1 --gemv-budget-s 110 --e2e-repeats 3 --out $OUT/fused_e2e.json > $OUT/fused_e2e.log 2>&1
echo "bench rc $? at ${SECONDS}s"; grep -E "fused op|fused batch|fused table|e2e|^\[|Error|error" $OUT/fused_e2e.log | grep '"rows": 1\|batch\|table\|e2e\|rror\|^\[' | cut -c1-330
