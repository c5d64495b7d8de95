# Session 21 call F: the CUDA tests (cuda_int4 with the runtime's PDL path; the Triton attention with PDL), then
# 8B decode at batch 1 with kernel_pdl on and off (MMA kernels + attention), interleaved, bf16 in the first two;
# then the profile of one int4 step at batch 1 (PDL on).
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl 2>/dev/null && export PYTHONPATH=/tmp/site:$PWD || exit 3
echo "main $(cat .devq/commit)"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/runtime/test_cuda_int4.py tests/runtime/test_triton_attention.py > $OUT/cuda_tests.txt 2>&1
echo "cuda tests rc $? at ${SECONDS}s"; grep -E "passed|failed|^FAILED|Error" $OUT/cuda_tests.txt | tail -8
B="python3 bench/torch_bench.py --device cuda --shape llama3-8b --batch 1 --single-step-peer 0"
timeout 110 $B --sections copy,bf16,int4 --kernel-pdl on --out $OUT/on1.json > $OUT/on1.log 2>&1; echo "on1 rc $? at ${SECONDS}s"
timeout 90 $B --sections bf16,int4 --kernel-pdl off --out $OUT/off1.json > $OUT/off1.log 2>&1; echo "off1 rc $? at ${SECONDS}s"
timeout 70 $B --sections int4 --kernel-pdl on --out $OUT/on2.json > $OUT/on2.log 2>&1; echo "on2 rc $? at ${SECONDS}s"
timeout 70 $B --sections int4 --kernel-pdl off --out $OUT/off2.json > $OUT/off2.log 2>&1; echo "off2 rc $? at ${SECONDS}s"
for f in on1 off1 on2 off2; do python3 -c "
import json; d=json.load(open('$OUT/$f.json'))
for k in ('bf16','int4'):
    for r in d.get(k, {}).get('results', []): print('$f', k, 'pdl', d[k].get('kernel_pdl'), r['batch'], round(r['decode_tokens_per_s'],1), round(r['decode_step_ms'],3))
" 2>&1 | tail -3; done
timeout 90 $B --sections profile --out $OUT/profile.json > $OUT/profile.log 2>&1
echo "profile rc $? at ${SECONDS}s"; python3 -c "
import json; p=json.load(open('$OUT/profile.json'))['profile']['int4_batch1']
print(p['wall_ms_per_step'], p['gpu_us_per_step'], p['kernels_per_step'])
for t in p['top'][:10]: print(t)" 2>&1 | tail -12
