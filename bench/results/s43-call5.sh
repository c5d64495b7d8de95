# Session 43, call 5 (an H100 or H200): the CLI end to end at the default options with the new fused_decode auto.
# The trained demo widened to llama3-8b, built as a bf16 torch-compile artifact (no quantization, no validation),
# then `run` alone and `run --speculative int4` on one prompt, 128 new tokens: the same text? Then `bench
# --speculative int4 --batch 1` (the artifact alone first, same process), for the product's own speed-up.
source bench/results/device_env.sh || exit 3
LIMIT=${LIMIT:-470}
nvidia-smi --query-gpu=name --format=csv,noheader
D=lorafast_export/data/demo
CLI="python3 -m lorafast_export.cli"
python3 scripts/make_model.py widen /tmp/w8b --base $D/base --adapter $D/lora --preset llama3-8b --dtype bfloat16 --device cuda > $OUT/widen.log 2>&1
echo "widen rc $? at ${SECONDS}s"
timeout 150 $CLI build --base /tmp/w8b/base --adapter /tmp/w8b/lora --target torch-compile --quant none --no-validate --device cuda --out /tmp/tc > $OUT/build.log 2>&1
echo "build rc $? at ${SECONDS}s"; tail -2 $OUT/build.log | cut -c1-300
P='def load_config(path):
    """Read a JSON config file and'
timeout 120 $CLI run --artifact /tmp/tc --prompt "$P" --max-new-tokens 128 --device cuda > $OUT/plain.txt 2> $OUT/plain.err
echo "run rc $? at ${SECONDS}s"
timeout 150 $CLI run --artifact /tmp/tc --prompt "$P" --max-new-tokens 128 --device cuda --speculative int4 > $OUT/spec.txt 2> $OUT/spec.err
echo "run --speculative rc $? at ${SECONDS}s"
cmp $OUT/plain.txt $OUT/spec.txt && echo "SAME TEXT ($(wc -c < $OUT/plain.txt) bytes)" || { echo DIFFERENT; tail -3 $OUT/plain.err $OUT/spec.err | cut -c1-300; }
head -c 400 $OUT/plain.txt; echo
REM=$((LIMIT - SECONDS - 3))
if (( REM > 60 )); then
  timeout $REM $CLI --json bench --artifact /tmp/tc --speculative int4 --batch 1 --new-tokens 128 --device cuda > $OUT/bench.json 2> $OUT/bench.err
  echo "bench rc $? at ${SECONDS}s"; tail -c 1500 $OUT/bench.json; tail -2 $OUT/bench.err | cut -c1-300
else
  echo "no time left for bench (${REM}s)"
fi
