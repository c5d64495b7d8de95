# Session 26 call D (not run in session 26: no device was lent): the headline build on a trained model at the 8B
# shape. scripts/make_model.py widen lays the demo base and its LoRA into llama3-8b's widths and depth (the same
# function up to rounding; 16 GB bf16), then `build --target trt-llm --quant awq` with default validation from
# cold caches, and `--target torch-compile --quant gptq`. On random weights every 8B build so far exited 1 on the
# default gates; here the gates see a fine-tune whose predictions mean something.
source bench/results/device_env.sh || exit 3
D=lorafast_export/data/demo
python3 scripts/make_model.py widen /tmp/w8b --base $D/base --adapter $D/lora --preset llama3-8b --dtype bfloat16 --device cuda > $OUT/widen.log 2>&1
echo "widen rc $? at ${SECONDS}s"; tail -2 $OUT/widen.log
echo "[$SECONDS s] trt-llm awq (the headline), trained 8B-wide"
timeout 270 python3 bench/validate_scale.py build --base /tmp/w8b/base --adapter /tmp/w8b/lora --quant awq --target trt-llm --logs $OUT --json-out $OUT/rows.jsonl > $OUT/trtllm-bench.log 2>&1
echo "trt-llm rc $? at ${SECONDS}s"; tail -3 $OUT/trtllm-bench.log
echo "[$SECONDS s] torch-compile gptq, trained 8B-wide"
timeout $((590 - SECONDS)) python3 bench/validate_scale.py build --base /tmp/w8b/base --adapter /tmp/w8b/lora --quant gptq --target torch-compile --logs $OUT --json-out $OUT/rows.jsonl > $OUT/tc-bench.log 2>&1
echo "torch-compile rc $? at ${SECONDS}s"; tail -3 $OUT/tc-bench.log
grep -h "gate\|PASS\|FAIL\|kl" $OUT/build-*.log | cut -c1-200 | tail -30
(cd $OUT && tar czf /tmp/callD.tgz . && rm -rf ./* && mv /tmp/callD.tgz .)
