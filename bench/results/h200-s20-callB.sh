# Session 20 call B: the MMA kernel's register cap (blocks per SM) and SUBA variant: its CUDA tests, then the int4 kernel
# table's 1-8 row buckets with it swept beside the shipped entries (merged into the shipped table in this tree),
# then bf16 and int4 decode at batch 1 and 8 on the 8B shape with that table.
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 3
echo "main $(cat .devq/commit)"
python3 -c "import torch; print(torch.__version__, hasattr(torch.cuda, '_compile_kernel'))"
timeout 170 python3 -m pytest -q -p no:cacheprovider tests/runtime/test_cuda_int4.py > $OUT/cuda_tests.txt 2>&1
echo "cuda tests rc $? at ${SECONDS}s" | tee -a $OUT/cuda_tests.txt; grep -E "passed|failed|Error|error|assert" $OUT/cuda_tests.txt | head -20
timeout 220 python3 bench/int4_kernels.py --budget-s 190 --shapes llama3-8b --rows 1,8,4,2 --reuse-old --sweep mma --merge-into lorafast_export/data/kernels/int4_h200.json --out $OUT/int4_s20B.json > $OUT/int4_kernels.log 2>&1
echo "int4_kernels rc $? at ${SECONDS}s"; cut -c1-600 $OUT/int4_kernels.log | grep -v "^ *$" | tail -20; cp lorafast_export/data/kernels/int4_h200.json $OUT/int4_h200_merged.json
timeout $((570 - SECONDS)) python3 bench/torch_bench.py --device cuda --shape llama3-8b --sections copy,bf16,int4 --batch 1,8 --single-step-peer 0 --out $OUT/decode.json > $OUT/decode.log 2>&1
echo "decode rc $? at ${SECONDS}s"; grep -E "^\[|tok/s|rror" $OUT/decode.log | cut -c1-300 | tail -30
