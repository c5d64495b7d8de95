# Session 20 call F: the fused MMA ops at their measured layouts (call E), one row only: the CUDA tests, then
# bf16 and int4 decode at batch 1 and 8 with fused_decode auto (int4 layers take the fused MMA ops) and int4 with
# fused_decode off (the unfused MMA kernels, call B's path), then the per-kernel profile of int4 decode at batch 1.
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl 2>/dev/null && export PYTHONPATH=/tmp/site:$PWD || exit 3
echo "main $(cat .devq/commit)"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/runtime/test_cuda_int4.py > $OUT/cuda_tests.txt 2>&1
echo "cuda tests rc $? at ${SECONDS}s"; grep -E "passed|failed|^FAILED|^E  " $OUT/cuda_tests.txt | head -20
timeout $((330 - SECONDS)) python3 bench/torch_bench.py --device cuda --shape llama3-8b --sections copy,bf16,int4 --batch 1,8 --single-step-peer 0 --out $OUT/decode_auto.json > $OUT/decode_auto.log 2>&1
echo "decode auto rc $? at ${SECONDS}s"; grep -E "fused decode|rror|arning" $OUT/decode_auto.log | head -5
timeout $((420 - SECONDS)) python3 bench/torch_bench.py --device cuda --shape llama3-8b --sections int4 --batch 1,8 --single-step-peer 0 --fused-decode off --out $OUT/decode_off.json > $OUT/decode_off.log 2>&1
echo "decode off rc $? at ${SECONDS}s"
timeout $((460 - SECONDS)) python3 bench/torch_bench.py --device cuda --shape llama3-8b --sections int4 --batch 1,8 --single-step-peer 0 --out $OUT/decode_auto2.json > $OUT/decode_auto2.log 2>&1
echo "decode auto2 rc $? at ${SECONDS}s"
timeout $((500 - SECONDS)) python3 bench/torch_bench.py --device cuda --shape llama3-8b --sections int4 --batch 1,8 --single-step-peer 0 --fused-decode off --out $OUT/decode_off2.json > $OUT/decode_off2.log 2>&1
echo "decode off2 rc $? at ${SECONDS}s"
for f in auto off auto2 off2; do python3 -c "
import json; d=json.load(open('$OUT/decode_$f.json'))
for k in ('bf16','int4'):
    for r in d.get(k, {}).get('results', []): print('$f', k, r['batch'], round(r['decode_tokens_per_s'],1), round(r['decode_step_ms'],3))
"; done
timeout $((595 - SECONDS)) python3 bench/torch_bench.py --device cuda --shape llama3-8b --sections profile --batch 1 --single-step-peer 0 --out $OUT/profile.json > $OUT/profile.log 2>&1
echo "profile rc $? at ${SECONDS}s"; python3 -c "
import json; p=json.load(open('$OUT/profile.json'))['profile']['int4_batch1']
print(p['wall_ms_per_step'], p['gpu_us_per_step'], p['kernels_per_step'])
for t in p['top'][:8]: print(t)"
