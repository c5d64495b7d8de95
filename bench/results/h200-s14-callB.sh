# Session 14 lead call B: the fused kernels' CUDA tests, then one table on the default options (fused_decode auto):
# bf16 and int4 decode at batch 1 and 32, the mixed 32-request workload, the fused section (off vs on, shipped
# tiles), end to end against transformers' static cache + compile (the order that faulted in session 13, with
# GraphRunner now clearing cuBLAS workspaces around its captures), speculative on the 8B shape and on the demo.
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 3
echo "main $(cat .devq/commit)"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/runtime/test_triton_fused.py > $OUT/cuda_tests_fused.txt 2>&1
echo "fused tests rc $? at ${SECONDS}s" | tee -a $OUT/cuda_tests_fused.txt; tail -2 $OUT/cuda_tests_fused.txt
timeout $((590 - SECONDS)) python3 bench/torch_bench.py --device cuda --shape llama3-8b --sections copy,bf16,int4,mixed,fused,e2e,spec,specdemo --batch 1,32 --single-step-peer 0 --mixed-peer none --mixed-policies default --fused-tiles shipped --fused-batches 1 --e2e-repeats 5 --out $OUT/table.json > $OUT/table.log 2>&1
echo "bench rc $? at ${SECONDS}s"; grep -E "^\[|fused batch|e2e|rror" $OUT/table.log | cut -c1-420
