# Session 19 call F: the final commit's CUDA tests of the MMA kernel (its variant now compiled at load, with a
# fallback), int4 decode at batch 1 once more, and whether Nsight Compute / Systems exist on the device.
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl 2>/dev/null && export PYTHONPATH=/tmp/site:$PWD || exit 3
echo "main $(cat .devq/commit)"; which ncu nsys nvcc 2>&1 | head -3; ls /usr/local/cuda*/bin 2>&1 | head -3
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/runtime/test_cuda_int4.py > $OUT/cuda_tests.txt 2>&1
echo "cuda tests rc $? at ${SECONDS}s" | tee -a $OUT/cuda_tests.txt; grep -E "passed|failed" $OUT/cuda_tests.txt | tail -2
timeout $((300 - SECONDS)) python3 bench/torch_bench.py --device cuda --shape llama3-8b --sections int4 --batch 1 --single-step-peer 0 --out $OUT/int4.json > $OUT/int4.log 2>&1
echo "int4 rc $? at ${SECONDS}s"; python3 -c "import json; r=json.load(open('$OUT/int4.json'))['int4']['results'][0]; print(r['decode_tokens_per_s'], r['decode_step_ms'])"
