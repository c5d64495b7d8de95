# Session 22 call A: SUBX (runtime/cuda_int4.py: the offset removed once a group by the activations' group sums, A
# without the per-register subtraction). Its CUDA tests; the 32-layer chain at the shipped layouts with PDL, with
# and without SUBX; the table's 1- and 2-row MMA cells and the fused ops' 1-row layouts re-swept with SUBX among the
# variants (merged into this tree's table, copied back); int4 decode at batch 1 with the merged and the shipped table.
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl 2>/dev/null && export PYTHONPATH=/tmp/site:$PWD || exit 3
echo "main $(cat .devq/commit) + working tree"
T=lorafast_export/data/kernels/int4_h200.json
cp $T /tmp/shipped.json
timeout 170 python3 -m pytest -q -p no:cacheprovider tests/runtime/test_cuda_int4.py > $OUT/cuda_tests.txt 2>&1
echo "cuda tests rc $? at ${SECONDS}s"; grep -E "passed|failed|^FAILED|Error" $OUT/cuda_tests.txt | tail -8
timeout 100 python3 bench/mma_chain_bench.py --configs "PDL,PDL + SUBX" --out $OUT/chain.json 2>&1 | cut -c1-220 | tail -7
echo "chain at ${SECONDS}s"
timeout 60 python3 bench/int4_kernels.py --shapes llama3-8b --rows 1,2 --reuse-old --sweep mma --merge-into $T --out $OUT/int4_s22A.json > $OUT/int4_kernels.log 2>&1
echo "int4_kernels rc $? at ${SECONDS}s"; grep "rows" $OUT/int4_kernels.log | cut -c1-260 | tail -8
timeout 120 python3 bench/mma_fused_bench.py --rows 1 --merge-into $T --out $OUT/fused_s22A.json > $OUT/fused.log 2>&1
echo "fused rc $? at ${SECONDS}s"; cut -c1-330 $OUT/fused.log | tail -4
cp $T $OUT/int4_h200_merged.json
B="python3 bench/torch_bench.py --device cuda --shape llama3-8b --batch 1 --single-step-peer 0 --sections int4"
timeout 80 $B --out $OUT/merged1.json > $OUT/merged1.log 2>&1; echo "merged1 rc $? at ${SECONDS}s"
cp /tmp/shipped.json $T
timeout 75 $B --out $OUT/shipped1.json > $OUT/shipped1.log 2>&1; echo "shipped1 rc $? at ${SECONDS}s"
for f in merged1 shipped1; do python3 -c "
import json; d=json.load(open('$OUT/$f.json'))
for r in d.get('int4', {}).get('results', []): print('$f', r['batch'], round(r['decode_tokens_per_s'],1), round(r['decode_step_ms'],3))
" 2>&1 | tail -2; done
