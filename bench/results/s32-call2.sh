# Session 32, call 2 (an H100, right after call B merged rows 2 and 4 into the shipped H100 table, now in the
# working tree): call B's batch 32 ran tinygemm (0.39x bf16: the table had no tiled GEMM entry beyond 8 rows), so
# tune-kernels measures rows 32, 16 and 64 (every kernel and tile) over the shipped table into LORAFAST_CACHE, then
# int4 g128 against bf16 at batch 1, 8 and 32 with it. Pass LIMIT= the seconds it may run.
source bench/results/device_env.sh || exit 3
nvidia-smi --query-gpu=name --format=csv,noheader
export LORAFAST_CACHE=/tmp/lfc32
mkdir -p /tmp/cfg8b && python3 -c "import json,sys; sys.path.insert(0,'.'); from scripts.make_model import hf_config, shape_of; json.dump(hf_config(shape_of('llama3-8b')), open('/tmp/cfg8b/config.json','w'))"
timeout 260 python3 -m lorafast_export.cli --json tune-kernels --model /tmp/cfg8b --rows 32,16,64 --budget-s 200 > $OUT/tune.json 2> $OUT/tune.log
echo "tune-kernels rc $? at ${SECONDS}s"; tr -d '\n' < $OUT/tune.json | cut -c1-600; echo; cp $LORAFAST_CACHE/kernels/*.json $OUT/ 2>/dev/null
timeout $((${LIMIT:-590} - 10 - SECONDS)) python3 bench/torch_bench.py --device cuda --shape llama3-8b --sections copy,bf16,int4 --batch 1,8,32 --single-step-peer 0 --new-tokens 128 --out $OUT/decode.json > $OUT/decode.log 2>&1
echo "decode rc $? at ${SECONDS}s"; python3 bench/results/table_summary.py $OUT/decode.json 2>&1 | tail -8
(cd $OUT && tar czf /tmp/call.tgz . && rm -rf ./* && mv /tmp/call.tgz .)
