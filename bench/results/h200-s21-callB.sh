# Session 21 call B: the CUDA tests of runtime/cuda_int4.py (DEC, PFS/PFT/EVF bit for bit), each op's floor
# (a plain read of its bytes, cold and L2-hot; the op cold and hot, with and without DEC), then the 32-layer
# chain with the DEC and prefetch variants (inputs fixed: outputs compared bit for bit).
# (bench/mma_prefetch_bench.py was the first version of bench/mma_chain_bench.py, with configurations for the
# PFS / PFT / EVF / DEC variant bits of bench/results/s21-prefetch-dec.patch; both were dropped after calls A-C.)
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl 2>/dev/null && export PYTHONPATH=/tmp/site:$PWD || exit 3
echo "main $(cat .devq/commit) + working tree"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/runtime/test_cuda_int4.py > $OUT/cuda_tests.txt 2>&1
echo "cuda tests rc $? at ${SECONDS}s"; grep -E "passed|failed|^FAILED|Error" $OUT/cuda_tests.txt | tail -8
timeout 120 python3 bench/mma_prefetch_bench.py --floors --out $OUT/floors.json 2>&1 | tail -8
echo "floors at ${SECONDS}s"
timeout 150 python3 bench/mma_prefetch_bench.py --caps 8 --out $OUT/chain.json 2>&1 | tail -12
echo "done at ${SECONDS}s"
