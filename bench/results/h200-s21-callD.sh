# Session 21 call D: the CUDA tests of runtime/cuda_int4.py (with the runtime's PDL path: the tiny model's decode
# bit for bit), then int4 decode at batch 1 with mma_pdl on and off, interleaved, bf16 batch 1 first.
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl 2>/dev/null && export PYTHONPATH=/tmp/site:$PWD || exit 3
echo "main $(cat .devq/commit)"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/runtime/test_cuda_int4.py > $OUT/cuda_tests.txt 2>&1
echo "cuda tests rc $? at ${SECONDS}s"; grep -E "passed|failed|^FAILED|Error" $OUT/cuda_tests.txt | tail -8
B="python3 bench/torch_bench.py --device cuda --shape llama3-8b --batch 1 --single-step-peer 0"
S=$SECONDS
timeout 110 $B --sections copy,bf16,int4 --mma-pdl on --out $OUT/on1.json > $OUT/on1.log 2>&1; echo "on1 rc $? at ${SECONDS}s"
timeout 70 $B --sections int4 --mma-pdl off --out $OUT/off1.json > $OUT/off1.log 2>&1; echo "off1 rc $? at ${SECONDS}s"
timeout 70 $B --sections int4 --mma-pdl on --out $OUT/on2.json > $OUT/on2.log 2>&1; echo "on2 rc $? at ${SECONDS}s"
timeout 70 $B --sections int4 --mma-pdl off --out $OUT/off2.json > $OUT/off2.log 2>&1; echo "off2 rc $? at ${SECONDS}s"
for f in on1 off1 on2 off2; do python3 -c "
import json; d=json.load(open('$OUT/$f.json'))
for k in ('bf16','int4'):
    for r in d.get(k, {}).get('results', []): print('$f', k, 'pdl', d[k].get('mma_pdl'), r['batch'], round(r['decode_tokens_per_s'],1), round(r['decode_step_ms'],3))
" 2>&1 | tail -3; done
