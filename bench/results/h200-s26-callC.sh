# Session 26 call C (not run in session 26: no device was lent; run after session 25's call A): speculative decoding
# on the trained demo widened to the 8B shape (torch_bench section specwide: scripts/make_model.py widen, bf16, an
# int4 RTN g128 draft, with its lm_head in bf16 and then quantized, as option draft_int4_head does: the verify is
# the bf16 model, so the output cannot change). k = 2 and 4 (always), 4 (auto); 128 new tokens; median of 3 runs.
source bench/results/device_env.sh || exit 3
spec() {
python3 - "$1" <<'PY'
import json, sys
d = json.load(open(sys.argv[1])).get("specwide", {})
print("specwide draft", d.get("draft"), "alone", d.get("bf16_alone", {}).get("decode_tokens_per_s"))
for k, v in d.items():
    if isinstance(v, dict) and "speedup_decode_vs_alone" in v:
        print(" ", k, v.get("speculation"), "acc", v.get("acceptance_all_prompts"), "x", round(v["speedup_decode_vs_alone"], 3), "equal", v.get("tokens_equal_alone"), "runs", v.get("decode_tokens_per_s_repeats"))
PY
}
for h in 0 1; do
  flag=$([ $h = 1 ] && echo --quant-lm-head)
  timeout $(( h == 0 ? 290 : 585 - SECONDS )) python3 bench/torch_bench.py --device cuda --shape llama3-8b --sections specwide --spec-k 2,4 --new-tokens 128 --spec-repeats 3 $flag --out $OUT/specwide-$h.json > $OUT/specwide-$h.log 2>&1
  echo "specwide head-quantized=$h rc $? at ${SECONDS}s"; spec $OUT/specwide-$h.json; grep -E "^\[|Error|error" $OUT/specwide-$h.log | cut -c1-200 | tail -3
done
(cd $OUT && tar czf /tmp/callC.tgz . && rm -rf ./* && mv /tmp/callC.tgz .)
