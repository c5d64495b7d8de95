# Session 44, call 3 (an H100): calls 1 and 2's essentials in one call, in order of need, each part given what time
# is left: the CLI end to end at 8B (run vs run --speculative int4: the same text? load times), the untabled
# llama2-7b shape at batch 1 (fused_decode on against mma with the new MMA_DEFAULT), then generate at batch 16
# plain and speculative (outputs compared), then bench --speculative int4.
source bench/results/device_env.sh || exit 3
L=${LIMIT:-590}
nvidia-smi --query-gpu=name --format=csv,noheader
D=lorafast_export/data/demo
CLI="python3 -m lorafast_export.cli"
python3 scripts/make_model.py widen /tmp/w8b --base $D/base --adapter $D/lora --preset llama3-8b --dtype bfloat16 --device cuda > $OUT/widen.log 2>&1
echo "widen rc $? at ${SECONDS}s"
timeout 150 $CLI build --base /tmp/w8b/base --adapter /tmp/w8b/lora --target torch-compile --quant none --no-validate --device cuda --out /tmp/tc > $OUT/build.log 2>&1
echo "build rc $? at ${SECONDS}s"; tail -1 $OUT/build.log | cut -c1-200
P='def load_config(path):
    """Read a JSON config file and'
T0=$SECONDS; timeout 120 $CLI run --artifact /tmp/tc --prompt "$P" --max-new-tokens 128 --device cuda > $OUT/plain.txt 2> $OUT/plain.err
echo "run rc $? in $((SECONDS - T0))s"; tail -2 $OUT/plain.err | cut -c1-300
T0=$SECONDS; timeout 140 $CLI run --artifact /tmp/tc --prompt "$P" --max-new-tokens 128 --device cuda --speculative int4 > $OUT/spec.txt 2> $OUT/spec.err
echo "run --speculative rc $? in $((SECONDS - T0))s"; tail -2 $OUT/spec.err | cut -c1-300
cmp $OUT/plain.txt $OUT/spec.txt && echo "run: SAME TEXT ($(wc -c < $OUT/plain.txt) bytes)" || echo "run: DIFFERENT"
head -c 200 $OUT/plain.txt; echo
REM=$((L - SECONDS - 60))
if (( REM > 120 )); then
  T0=$SECONDS; timeout $REM python3 bench/torch_bench.py --device cuda --shape llama2-7b --sections fused --fused-tiles mma-shipped --fused-batches 1 --new-tokens 128 --out $OUT/e2e.json > $OUT/e2e.log 2>&1
  echo "llama2-7b fused rc $? in $((SECONDS - T0))s"; grep -E "fused op|fused batch|rror" $OUT/e2e.log | cut -c1-500
else
  echo "no time for llama2-7b (${REM}s)"
fi
python3 - > /tmp/prompts.jsonl <<'PY'
import json, pathlib
src = pathlib.Path("lorafast_export/cli.py").read_text().splitlines()
for i in range(16):
    print(json.dumps({"prompt": "\n".join(src[40 * i : 40 * i + 6])}))
PY
for mode in plain spec; do
  extra=""; [[ $mode == spec ]] && extra="--speculative int4"
  REM=$((L - 5 - SECONDS))
  (( REM > 50 )) || { echo "no time for generate $mode"; continue; }
  T0=$SECONDS; timeout $REM $CLI generate --artifact /tmp/tc --input /tmp/prompts.jsonl --output $OUT/gen_$mode.jsonl --max-new-tokens 64 --batch-size 16 --device cuda $extra > $OUT/gen_$mode.log 2>&1
  echo "generate $mode rc $? in $((SECONDS - T0))s"; tail -1 $OUT/gen_$mode.log | cut -c1-200
done
python3 - <<'PY'
import json, os
out = os.environ["OUT"]
try:
    a, b = ([json.loads(l) for l in open(f"{out}/gen_{m}.jsonl")] for m in ("plain", "spec"))
except OSError as e:
    print("generate compare: missing", e)
else:
    same = sum(x["completion"] == y["completion"] for x, y in zip(a, b))
    print(f"generate: {same} of {len(a)} completions equal ({len(b)} speculative)")
PY
