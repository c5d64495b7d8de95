# Session 25 call A (not run in session 25: no device was lent): the dense fused ops (triton_fused.py) and the final
# norm + lm_head as programmatic dependent launches that ask L2 for their weight rows before they wait (runtime
# option fused_pdl). First their CUDA tests, then bf16 and int4 at batch 1, interleaved off / on / off / on (the
# attention and the int4 MMA kernels are PDL in both, kernel_pdl). Last, with fused_pdl on: end to end against
# transformers' static cache + compile (5 pairs) and the trained demo's speculative rows, median of 5 runs each.
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl 2>/dev/null && export PYTHONPATH=/tmp/site:$PWD || exit 3
echo "main $(cat .devq/commit) + session 25's working tree"
timeout 240 python3 -m pytest -q -rs -p no:cacheprovider tests/runtime/test_triton_fused.py tests/runtime/test_triton_attention.py > $OUT/cuda_tests.txt 2>&1
echo "fused + attention tests rc $? at ${SECONDS}s" | tee -a $OUT/cuda_tests.txt
timeout 240 python3 -m pytest -q -rs -p no:cacheprovider tests/runtime/test_cuda_int4.py -k "pdl or dependent or fused_mma" >> $OUT/cuda_tests.txt 2>&1
echo "cuda tests rc $? at ${SECONDS}s" | tee -a $OUT/cuda_tests.txt; grep -E "passed|failed|SKIP|Error" $OUT/cuda_tests.txt | tail -6
for i in 1 2; do
  for v in off on; do
    timeout 150 python3 bench/torch_bench.py --device cuda --shape llama3-8b --sections copy,bf16,int4 --batch 1 --eager-peer 0 --fused-pdl $v --out $OUT/ab-$v-$i.json > $OUT/ab-$v-$i.log 2>&1
    echo "ab $v $i rc $? at ${SECONDS}s"; python3 bench/results/decode_rows.py $OUT/ab-$v-$i.json
  done
done
timeout $((585 - SECONDS)) python3 bench/torch_bench.py --device cuda --shape llama3-8b --sections e2e,specdemo --e2e-repeats 5 --fused-pdl on --out $OUT/e2e.json > $OUT/e2e.log 2>&1
echo "e2e rc $? at ${SECONDS}s"
python3 - "$OUT/e2e.json" <<'PY' 2>&1 | tail -12
import json, sys
d = json.load(open(sys.argv[1]))
e = d.get("e2e", {})
print("e2e", e.get("ours_median"), e.get("peer_median"), e.get("speedup_median"), e.get("speedup_pairs"))
for k, v in d.get("specdemo", {}).items():
    if isinstance(v, dict) and ("spec_acceptance" in v or "tokens_per_s" in v or "decode_tokens_per_s" in v):
        print("specdemo", k, v.get("speculation"), "acc", v.get("acceptance", v.get("acceptance_all_prompts")), "x", v.get("speedup_decode_vs_bf16", v.get("speedup_decode_vs_alone")), "equal", v.get("tokens_equal_bf16_alone", v.get("tokens_equal_alone")), "runs", v.get("decode_tokens_per_s_repeats"))
PY
