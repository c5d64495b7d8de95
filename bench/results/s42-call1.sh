# Session 42, call 1: the dense fused ops with a verify's rows in one program (_fused_rows_kernel). (1) The probe at
# the 8B shapes: a program a row against the rows kernel's (RB, BN) candidates and the tensor cores, at 1-8 rows,
# each rows result checked bit for bit against the one-row decode step. (2) Speculation at 8B with the default
# options (section specwide, k = 4, rounds chained, int8 draft head) taking the probe's fastest bit-identical
# configurations, the default runtime alone beside it (its rate, token identity). (3) The fused kernels' CUDA tests.
source bench/results/device_env.sh || exit 3
LIMIT=${LIMIT:-580}
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 240 python3 bench/fused_rows_probe.py --rows 1,2,4,5,8 --out $OUT/probe.json > $OUT/probe.log 2>&1
echo "probe rc $? at ${SECONDS}s"; sed -n '/^op /,$p' $OUT/probe.log; grep -m3 -E "rror|Traceback" $OUT/probe.log | cut -c1-300
timeout $((LIMIT - SECONDS - 100)) python3 bench/torch_bench.py --device cuda --shape llama3-8b --sections specwide --overlap-rounds on --new-tokens 128 --spec-repeats 2 --spec-k 4 --draft-head int8 --fused-rows $OUT/probe.json --spec-vs-default --out $OUT/spec.json > $OUT/spec.log 2>&1
echo "spec rc $? at ${SECONDS}s"; grep -E "fused rows table|specwide k|alone:|rror" $OUT/spec.log | cut -c1-700
python3 -c "import json; r=json.load(open('$OUT/spec.json'))['specwide']; print('default alone', r.get('default_alone',{}).get('decode_tokens_per_s'), 'alone tokens equal default', r.get('alone_tokens_equal_default'))" 2>&1 | tail -1
timeout $((LIMIT - SECONDS - 5)) python3 -m pytest -q -x tests/runtime/test_triton_fused.py > $OUT/tests.log 2>&1
echo "tests rc $? at ${SECONDS}s"; tail -5 $OUT/tests.log
