# Session 30, call A (an H100: no H200 came). (1) The speculative runtime's CUDA tests, whose device-side round inputs
# and overlap_rounds have not yet run on a GPU. (2) The first int4 kernel table for the H100 at rows 1 and 8 (every kernel
# swept, through `lorafast-export tune-kernels`, its first GPU run) and the fused int4 ops at one row: without a table the H100's
# int4 draft runs tinygemm and unfused norms. (3) specwide (the trained demo widened to 8B, int4 g128 draft) at k = 4
# with fused_decode mma, rounds chained on the device off against on, with that table; (4) the default runtime alone
# at batch 1 (bf16, fused_decode auto: the FMA kernels), the comparator of issue 15's 1.6x line, in the same call.
# Pass LIMIT= the seconds the call may run (580: one call).
source bench/results/device_env.sh || exit 3
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 100 python3 -m pytest -q -rs -p no:cacheprovider tests/runtime/test_triton_fused.py -k "speculative or verify or auto_mma" > $OUT/cuda_tests.txt 2>&1
echo "fused draft tests rc $? at ${SECONDS}s"; tail -2 $OUT/cuda_tests.txt
# the table through `lorafast-export tune-kernels` (its first GPU run), into LORAFAST_CACHE, which the runtime
# below reads before any shipped table; copied to $OUT to ship as data/kernels/int4_h100_80gb_hbm3.json
export LORAFAST_CACHE=/tmp/lfc
mkdir -p /tmp/cfg8b && python3 -c "import json,sys; sys.path.insert(0,'.'); from scripts.make_model import hf_config, shape_of; json.dump(hf_config(shape_of('llama3-8b')), open('/tmp/cfg8b/config.json','w'))"
timeout 250 python3 -m lorafast_export.cli --json tune-kernels --model /tmp/cfg8b --rows 1,8 --budget-s 170 > $OUT/tune.json 2> $OUT/tune.log
echo "tune-kernels rc $? at ${SECONDS}s"; cat $OUT/tune.json | tr -d '\n' | cut -c1-600; echo; cp /tmp/lfc/kernels/*.json $OUT/ 2>/dev/null
timeout $((${LIMIT:-590} - 75 - SECONDS)) python3 bench/torch_bench.py --device cuda --shape llama3-8b --sections copy,specwide --fused-decode mma --spec-k 4 --overlap-rounds ab --new-tokens 128 --spec-repeats 2 --out $OUT/specA.json > $OUT/specA.log 2>&1
echo "specwide rc $? at ${SECONDS}s"; grep -E "specwide k|alone:|copy:|rror" $OUT/specA.log | cut -c1-400
timeout $((${LIMIT:-590} - 5 - SECONDS)) python3 bench/torch_bench.py --device cuda --shape llama3-8b --sections bf16 --batch 1 --single-step-peer 0 --new-tokens 128 --out $OUT/bf16A.json > $OUT/bf16A.log 2>&1
echo "bf16 default rc $? at ${SECONDS}s"; grep -E "^\[|tok/s|rror" $OUT/bf16A.log | cut -c1-300 | tail -4
(cd $OUT && tar czf /tmp/call.tgz . && rm -rf ./* && mv /tmp/call.tgz .)
