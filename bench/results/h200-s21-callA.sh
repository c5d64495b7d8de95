# Session 21 call A: the CUDA tests of runtime/cuda_int4.py with the PF / EVF variant bits in the kernels'
# signatures, then bench/mma_prefetch_bench.py (an 8B step's 128 int4 products chained in one CUDA graph).
# (bench/mma_prefetch_bench.py was the first version of bench/mma_chain_bench.py, with configurations for the
# PFS / PFT / EVF / DEC variant bits of bench/results/s21-prefetch-dec.patch; both were dropped after calls A-C.)
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl 2>/dev/null && export PYTHONPATH=/tmp/site:$PWD || exit 3
echo "main $(cat .devq/commit) + working tree"
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/runtime/test_cuda_int4.py > $OUT/cuda_tests.txt 2>&1
echo "cuda tests rc $? at ${SECONDS}s"; grep -E "passed|failed|^FAILED" $OUT/cuda_tests.txt | tail -3
timeout 300 python3 bench/mma_prefetch_bench.py --out $OUT/prefetch.json --pieces 8192,32768 2>&1 | tail -60
echo "done at ${SECONDS}s"
