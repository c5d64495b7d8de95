# Session 20 call E: the fused MMA decode ops (runtime/cuda_int4.py) over their block layouts at the 8B shapes, 1 and 8
# rows, beside the plain MMA product at the shipped table's layout (bench/mma_fused_bench.py).
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl 2>/dev/null && export PYTHONPATH=/tmp/site:$PWD || exit 3
echo "main $(cat .devq/commit)"
timeout 400 python3 bench/mma_fused_bench.py --rows 1,8 --out $OUT/fused_sweep.json > $OUT/fused_sweep.log 2>&1
echo "sweep rc $? at ${SECONDS}s"; cut -c1-400 $OUT/fused_sweep.log | tail -12
