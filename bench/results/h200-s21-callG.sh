# Session 21 call G: 8B decode at batch 8 with kernel_pdl on and off (the plain MMA kernels at 8 rows and the
# attention take PDL too), interleaved, bf16 batch 8 in the first.
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl 2>/dev/null && export PYTHONPATH=/tmp/site:$PWD || exit 3
echo "main $(cat .devq/commit)"
B="python3 bench/torch_bench.py --device cuda --shape llama3-8b --batch 8 --single-step-peer 0"
timeout 100 $B --sections copy,bf16,int4 --kernel-pdl on --out $OUT/on1.json > $OUT/on1.log 2>&1; echo "on1 rc $? at ${SECONDS}s"
timeout 60 $B --sections int4 --kernel-pdl off --out $OUT/off1.json > $OUT/off1.log 2>&1; echo "off1 rc $? at ${SECONDS}s"
timeout 60 $B --sections int4 --kernel-pdl on --out $OUT/on2.json > $OUT/on2.log 2>&1; echo "on2 rc $? at ${SECONDS}s"
for f in on1 off1 on2; do python3 -c "
import json; d=json.load(open('$OUT/$f.json'))
for k in ('bf16','int4'):
    for r in d.get(k, {}).get('results', []): print('$f', k, 'pdl', d[k].get('kernel_pdl'), r['batch'], round(r['decode_tokens_per_s'],1), round(r['decode_step_ms'],3))
" 2>&1 | tail -3; done
