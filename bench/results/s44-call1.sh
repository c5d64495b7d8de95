# Session 44, call 1 (an H100 or H200): the CLI end to end at 8B after session 43's graph-room fix. The trained demo
# widened to llama3-8b, built as a bf16 torch-compile artifact (--no-validate); `run` and `run --speculative int4`
# on one prompt (the same text? the load times), `generate` of 16 prompts at batch 16 plain and speculative (the
# same outputs?), then with time left `bench --speculative int4`.
source bench/results/device_env.sh || exit 3
nvidia-smi --query-gpu=name --format=csv,noheader
D=lorafast_export/data/demo
CLI="python3 -m lorafast_export.cli"
python3 scripts/make_model.py widen /tmp/w8b --base $D/base --adapter $D/lora --preset llama3-8b --dtype bfloat16 --device cuda > $OUT/widen.log 2>&1
echo "widen rc $? at ${SECONDS}s"
timeout 150 $CLI build --base /tmp/w8b/base --adapter /tmp/w8b/lora --target torch-compile --quant none --no-validate --device cuda --out /tmp/tc > $OUT/build.log 2>&1
echo "build rc $? at ${SECONDS}s"; tail -2 $OUT/build.log | cut -c1-300
P='def load_config(path):
    """Read a JSON config file and'
T0=$SECONDS; timeout 130 $CLI run --artifact /tmp/tc --prompt "$P" --max-new-tokens 128 --device cuda > $OUT/plain.txt 2> $OUT/plain.err
echo "run rc $? in $((SECONDS - T0))s"; tail -3 $OUT/plain.err | cut -c1-300
T0=$SECONDS; timeout 150 $CLI run --artifact /tmp/tc --prompt "$P" --max-new-tokens 128 --device cuda --speculative int4 > $OUT/spec.txt 2> $OUT/spec.err
echo "run --speculative rc $? in $((SECONDS - T0))s"; tail -3 $OUT/spec.err | cut -c1-300
cmp $OUT/plain.txt $OUT/spec.txt && echo "run: SAME TEXT ($(wc -c < $OUT/plain.txt) bytes)" || echo "run: DIFFERENT"
head -c 300 $OUT/plain.txt; echo
python3 - > /tmp/prompts.jsonl <<'PY'
import json, pathlib
src = pathlib.Path("lorafast_export/cli.py").read_text().splitlines()
for i in range(16):
    print(json.dumps({"prompt": "\n".join(src[40 * i : 40 * i + 6])}))
PY
for mode in plain spec; do
  extra=""; [[ $mode == spec ]] && extra="--speculative int4"
  REM=$((420 - SECONDS))
  (( REM > 40 )) || { echo "no time for generate $mode"; continue; }
  T0=$SECONDS; timeout $REM $CLI generate --artifact /tmp/tc --input /tmp/prompts.jsonl --output $OUT/gen_$mode.jsonl --max-new-tokens 64 --batch-size 16 $extra > $OUT/gen_$mode.log 2>&1
  echo "generate $mode rc $? in $((SECONDS - T0))s"; tail -2 $OUT/gen_$mode.log | cut -c1-300
done
python3 - <<'PY'
import json, os
out = os.environ["OUT"]
try:
    a, b = ([json.loads(l) for l in open(f"{out}/gen_{m}.jsonl")] for m in ("plain", "spec"))
except OSError as e:
    print("generate compare: missing", e)
else:
    key = next(k for k in a[0] if k not in ("prompt", "id", "index"))
    same = sum(x[key] == y[key] for x, y in zip(a, b))
    print(f"generate: {same} of {len(a)} outputs equal (field {key!r}; {len(b)} speculative)")
PY
REM=$((500 - SECONDS))
if (( REM > 60 )); then
  timeout $REM $CLI --json bench --artifact /tmp/tc --speculative int4 --batch 1 --new-tokens 128 --device cuda > $OUT/bench.json 2> $OUT/bench.err
  echo "bench rc $? at ${SECONDS}s"; tail -c 1200 $OUT/bench.json; echo; tail -2 $OUT/bench.err | cut -c1-300
else
  echo "no time left for bench (${REM}s)"
fi
