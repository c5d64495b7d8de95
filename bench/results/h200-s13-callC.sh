# Session 13 lead call C: where call B's e2e section died (illegal memory access after the warm-ups, fused_decode on):
# e2e alone with CUDA_LAUNCH_BLOCKING=1 and fused on; if it fails, the same with fused off (is it ours or the peer's?);
# if it passes, e2e again without blocking (5 pairs), then the fused section (grid fix: BN = 1 on the lm_head).
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 3
echo "main $(cat .devq/commit)"
CUDA_LAUNCH_BLOCKING=1 timeout 200 python3 bench/torch_bench.py --device cuda --shape llama3-8b --sections e2e --fused-decode on --new-tokens 128 --e2e-repeats 2 --out $OUT/e2e_blocking_on.json > $OUT/e2e_blocking_on.log 2>&1
rc=$?; echo "e2e blocking fused-on rc $rc at ${SECONDS}s"; grep -E "e2e|Error|error|File \"/" $OUT/e2e_blocking_on.log | tail -25 | cut -c1-300
if [ $rc -ne 0 ]; then
  timeout 180 python3 bench/torch_bench.py --device cuda --shape llama3-8b --sections e2e --fused-decode off --new-tokens 128 --e2e-repeats 2 --out $OUT/e2e_off.json > $OUT/e2e_off.log 2>&1
  echo "e2e fused-off rc $? at ${SECONDS}s"; grep -E "e2e|Error" $OUT/e2e_off.log | tail -8 | cut -c1-300
else
  timeout $((580 - SECONDS)) python3 bench/torch_bench.py --device cuda --shape llama3-8b --sections copy,e2e,fused --fused-decode on --fused-batches 1 --new-tokens 128 --e2e-repeats 5 --gemv-budget-s 100 --out $OUT/e2e_fused.json > $OUT/e2e_fused.log 2>&1
  echo "e2e+fused rc $? at ${SECONDS}s"; grep -E "fused op|fused batch|fused table|e2e|^\[|Error" $OUT/e2e_fused.log | cut -c1-300
fi
