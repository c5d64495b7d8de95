# Session 20 call G: int4 decode at batch 1 with fused_decode off (the unfused MMA kernels) and auto (the fused MMA
# ops at call E's layouts), interleaved, bf16 batch 1 first (the bench now passes --fused-decode to the runtime).
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl 2>/dev/null && export PYTHONPATH=/tmp/site:$PWD || exit 3
echo "main $(cat .devq/commit)"
B="python3 bench/torch_bench.py --device cuda --shape llama3-8b --batch 1 --single-step-peer 0"
timeout 100 $B --sections copy,bf16,int4 --fused-decode auto --out $OUT/auto1.json > $OUT/auto1.log 2>&1; echo "auto1 rc $? at ${SECONDS}s"
timeout $((160 - SECONDS)) $B --sections int4 --fused-decode off --out $OUT/off1.json > $OUT/off1.log 2>&1; echo "off1 rc $? at ${SECONDS}s"
timeout $((215 - SECONDS)) $B --sections int4 --fused-decode auto --out $OUT/auto2.json > $OUT/auto2.log 2>&1; echo "auto2 rc $? at ${SECONDS}s"
timeout $((270 - SECONDS)) $B --sections int4 --fused-decode off --out $OUT/off2.json > $OUT/off2.log 2>&1; echo "off2 rc $? at ${SECONDS}s"
for f in auto1 off1 auto2 off2; do python3 -c "
import json; d=json.load(open('$OUT/$f.json'))
for k in ('bf16','int4'):
    for r in d.get(k, {}).get('results', []): print('$f', k, d[k].get('fused_decode'), r['batch'], round(r['decode_tokens_per_s'],1), round(r['decode_step_ms'],3))
" 2>/dev/null; done
