# Session 21 call E: the CUDA tests of runtime/cuda_int4.py (XS bit for bit), then bench/mma_chain_bench.py:
# per-op floors (with PDL and PDL + XS) and the 32-layer chain with PDL, PDL + XS on o and down.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl 2>/dev/null && export PYTHONPATH=/tmp/site:$PWD || exit 3
echo "main $(cat .devq/commit)"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/runtime/test_cuda_int4.py > $OUT/cuda_tests.txt 2>&1
echo "cuda tests rc $? at ${SECONDS}s"; grep -E "passed|failed|^FAILED|Error" $OUT/cuda_tests.txt | tail -8
timeout 120 python3 bench/mma_chain_bench.py --floors --out $OUT/floors.json 2>&1 | tail -8
echo "floors at ${SECONDS}s"
timeout 150 python3 bench/mma_chain_bench.py --out $OUT/chain.json 2>&1 | tail -18
echo "done at ${SECONDS}s"
