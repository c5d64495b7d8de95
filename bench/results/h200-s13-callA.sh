# Session 13 lead call A: the fused decode kernels' CUDA tests (+ the GEMV's), then torch_bench's fused section on the
# 8B shape (ops swept against cuBLAS; decode with fused_decode off/on at batch 1 and 4, interleaved; profile).
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 3
echo "main $(cat .devq/commit)"
nvidia-smi --query-gpu=name,clocks.max.mem --format=csv,noheader
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/runtime/test_triton_fused.py tests/runtime/test_triton_gemv.py > $OUT/cuda_tests_fused.txt 2>&1
echo "fused tests rc $? at ${SECONDS}s" | tee -a $OUT/cuda_tests_fused.txt; tail -3 $OUT/cuda_tests_fused.txt
timeout $((585 - SECONDS)) python3 bench/torch_bench.py --device cuda --shape llama3-8b --sections copy,fused --fused-batches 1,4 --new-tokens 128 --gemv-budget-s 110 --out $OUT/fused.json > $OUT/fused.log 2>&1
echo "bench rc $? at ${SECONDS}s"; grep -E "fused op|fused batch|^\[" $OUT/fused.log | cut -c1-400
