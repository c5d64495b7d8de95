# Suggested first device call of the next session (written in session 19, not run): why the CUDA MMA int4 kernel
# reads gate_up / down at only 2.4-2.6 TB/s and qkv / o at 1.5. Nsight Compute is on the H200 image
# (/usr/local/cuda/bin/ncu, found in session 19 call F): its full set for the first MMA launches of the 8B shapes at
# 1 row (memory throughput, stall reasons, issue-slot use, achieved occupancy), then the CUDA tests.
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl 2>/dev/null && export PYTHONPATH=/tmp/site:$PWD || exit 3
echo "main $(cat .devq/commit)"
timeout 300 /usr/local/cuda/bin/ncu --target-processes all -k regex:int4_mma -c 8 --set full -o $OUT/mma python3 bench/int4_kernels.py --shapes llama3-8b --rows 1 --reuse-old --sweep mma --out /tmp/int4_ncu.json > $OUT/ncu.log 2>&1
echo "ncu rc $? at ${SECONDS}s"; tail -5 $OUT/ncu.log
/usr/local/cuda/bin/ncu --import $OUT/mma.ncu-rep --page details > $OUT/mma_details.txt 2>&1; grep -E "int4_mma|Duration|Memory Throughput|DRAM Throughput|Achieved Occupancy|Issue Slots Busy|Registers Per" $OUT/mma_details.txt | head -60
timeout $((560 - SECONDS)) python3 -m pytest -q -p no:cacheprovider tests/runtime/test_cuda_int4.py > $OUT/cuda_tests.txt 2>&1
echo "cuda tests rc $? at ${SECONDS}s"; grep -E "passed|failed" $OUT/cuda_tests.txt | tail -2
