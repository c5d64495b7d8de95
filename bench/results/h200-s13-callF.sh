# Session 13 lead call F: call E (fused section, then e2e) with transformers' compiled peer unable to clear cuBLAS workspaces.
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 3
echo "main $(cat .devq/commit)"
LF_BENCH_KEEP_CUBLAS_WORKSPACES=1 timeout $((585 - SECONDS)) python3 bench/torch_bench.py --device cuda --shape llama3-8b --sections copy,fused,e2e --fused-decode on --fused-tiles shipped --fused-batches 1 --fused-e2e 1 --new-tokens 128 --e2e-repeats 3 --out $OUT/fused_e2e.json > $OUT/fused_e2e.log 2>&1
echo "bench rc $? at ${SECONDS}s"; grep -E "fused batch|e2e|^\[|Error|error|File \"\/" $OUT/fused_e2e.log | cut -c1-260
