# Session 22 call B (not run: no device was lent in session 22): int4 decode at batch 1 with the lm_head quantized
# too (int4 RTN g128, a build's quant.quantize_lm_head), against the default int4 (bf16 head) and bf16, on the 8B
# shape. First the lm_head shape [128256, 4096] joins the int4 table at 1 row (the MMA kernel swept beside the other
# kernels, merged into this tree's table, copied back), so the quantized head runs a measured kernel.
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl 2>/dev/null && export PYTHONPATH=/tmp/site:$PWD || exit 3
echo "main $(cat .devq/commit) + working tree"
T=lorafast_export/data/kernels/int4_h200.json
timeout 120 python3 bench/int4_kernels.py --shapes llama3-8b --with-head --rows 1 --reuse-old --sweep mma --merge-into $T --out $OUT/int4_head.json > $OUT/int4_head.log 2>&1
echo "int4_kernels rc $? at ${SECONDS}s"; grep "rows" $OUT/int4_head.log | cut -c1-260 | tail -6
cp $T $OUT/int4_h200_with_head.json
B="python3 bench/torch_bench.py --device cuda --shape llama3-8b --batch 1 --single-step-peer 0"
timeout 110 $B --sections copy,bf16,int4 --out $OUT/plain1.json > $OUT/plain1.log 2>&1; echo "plain1 rc $? at ${SECONDS}s"
timeout 80 $B --sections int4 --quant-lm-head --out $OUT/head1.json > $OUT/head1.log 2>&1; echo "head1 rc $? at ${SECONDS}s"
timeout 75 $B --sections int4 --out $OUT/plain2.json > $OUT/plain2.log 2>&1; echo "plain2 rc $? at ${SECONDS}s"
timeout 80 $B --sections int4 --quant-lm-head --out $OUT/head2.json > $OUT/head2.log 2>&1; echo "head2 rc $? at ${SECONDS}s"
for f in plain1 head1 plain2 head2; do python3 -c "
import json; d=json.load(open('$OUT/$f.json'))
for k in ('bf16', 'int4'):
    r = d.get(k, {})
    for x in r.get('results', []): print('$f', k, r.get('kernels'), x['batch'], round(x['decode_tokens_per_s'],1), round(x['decode_step_ms'],3))
" 2>&1 | tail -2; done
