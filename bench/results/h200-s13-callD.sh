# Session 13 lead call D: the shipped table (call C's sweep) in call B's order (fused section first, then e2e):
# CUDA tests; fused ops at the shipped tiles; decode off/on at batch 1 (3 interleaved); e2e with fused_decode on.
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 3
echo "main $(cat .devq/commit)"
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/runtime/test_triton_fused.py > $OUT/cuda_tests_fused.txt 2>&1
echo "fused tests rc $? at ${SECONDS}s" | tee -a $OUT/cuda_tests_fused.txt; tail -2 $OUT/cuda_tests_fused.txt
timeout $((585 - SECONDS)) python3 bench/torch_bench.py --device cuda --shape llama3-8b --sections copy,fused,e2e --fused-decode on --fused-tiles shipped --fused-batches 1 --new-tokens 128 --e2e-repeats 5 --out $OUT/fused_e2e.json > $OUT/fused_e2e.log 2>&1
echo "bench rc $? at ${SECONDS}s"; grep -E "fused op|fused batch|fused table|e2e|^\[|Error|error" $OUT/fused_e2e.log | cut -c1-260
