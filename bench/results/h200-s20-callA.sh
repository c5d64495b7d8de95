# Session 20 call A: Nsight Compute on the CUDA int4 MMA kernel at the 8B shapes, 1 row (why gate_up / down read at
# 2.4-2.6 TB/s and qkv / o at 1.5), clocks unlocked; then the reduced CUDA tests of the kernel (never run yet).
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl 2>/dev/null && export PYTHONPATH=/tmp/site:$PWD || exit 3
echo "main $(cat .devq/commit)"
NCU=/usr/local/cuda/bin/ncu
timeout 240 $NCU --target-processes all -k regex:int4_mma --launch-skip 4 -c 4 --set full --clock-control none -o $OUT/mma python3 bench/mma_ncu.py > $OUT/ncu.log 2>&1
echo "ncu rc $? at ${SECONDS}s"; tail -3 $OUT/ncu.log
$NCU --import $OUT/mma.ncu-rep --page details > $OUT/mma_details.txt 2>&1
grep -E "int4_mma|^    Duration|Memory Throughput|DRAM Throughput|Achieved Occupancy|Issue Slots Busy|Registers Per|Theoretical Occupancy|Waves Per SM" $OUT/mma_details.txt | head -60
$NCU --import $OUT/mma.ncu-rep --page raw --csv > $OUT/mma_raw.csv 2>/dev/null; ls -la $OUT
timeout $((560 - SECONDS)) python3 -m pytest -q -p no:cacheprovider tests/runtime/test_cuda_int4.py > $OUT/cuda_tests.txt 2>&1
echo "cuda tests rc $? at ${SECONDS}s"; grep -E "passed|failed" $OUT/cuda_tests.txt | tail -2
