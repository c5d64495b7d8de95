# Session 13 lead call B: fused kernels (one-pass RMSNorm, rows=1 unless speculating) CUDA tests; torch_bench's
# fused section on the 8B shape (tiles swept, the runtime then uses the fastest; decode off/on at batch 1 and 4;
# profile), then e2e with fused_decode on against transformers' static cache + compile (5 interleaved pairs).
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 3
echo "main $(cat .devq/commit)"
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/runtime/test_triton_fused.py tests/runtime/test_triton_gemv.py > $OUT/cuda_tests_fused.txt 2>&1
echo "fused tests rc $? at ${SECONDS}s" | tee -a $OUT/cuda_tests_fused.txt; tail -3 $OUT/cuda_tests_fused.txt
timeout $((585 - SECONDS)) python3 bench/torch_bench.py --device cuda --shape llama3-8b --sections copy,fused,e2e --fused-decode on --fused-batches 1,4 --new-tokens 128 --gemv-budget-s 150 --e2e-repeats 5 --out $OUT/fused.json > $OUT/fused.log 2>&1
echo "bench rc $? at ${SECONDS}s"; grep -E "fused op|fused batch|fused table|e2e|^\[" $OUT/fused.log | cut -c1-300
