# Session 33, call 2 (an H100): (1) where a chunked long prompt's time goes (8B bf16, a 3,072-token prompt, chunks
# of 512 against one forward, each once more under torch.profiler: the chunks' first token came at 184 ms against
# 88 in call 1); (2) int4 with the lm_head quantized at batch 1 and 32 against bf16 (call 1: 2.56x at batch 1),
# then int4 with the head in bf16 (the default) at batch 1 in another process. Pass LIMIT=.
source bench/results/device_env.sh || exit 3
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 150 python3 bench/torch_bench.py --device cuda --shape llama3-8b --sections longprompt --long-prompt-len 3072 --long-chunk 512 --long-running 4 --new-tokens 128 --max-seq-len 4096 --long-profile --out $OUT/longprof.json > $OUT/longprof.log 2>&1
echo "longprompt profile rc $? at ${SECONDS}s"; grep -E "longprompt chunk|^ +[0-9.]+ ms" $OUT/longprof.log | cut -c1-200; grep -o '"chunk_[0-9]*": {[^}]*}' $OUT/longprof.json
timeout 150 python3 bench/torch_bench.py --device cuda --shape llama3-8b --sections bf16,int4 --batch 1,32 --quant-lm-head --single-step-peer 0 --new-tokens 128 --out $OUT/head2.json > $OUT/head2.log 2>&1
echo "quantized head rc $? at ${SECONDS}s"; python3 bench/results/table_summary.py $OUT/head2.json 2>&1 | tail -5
timeout $((${LIMIT:-590} - 10 - SECONDS)) python3 bench/torch_bench.py --device cuda --shape llama3-8b --sections int4 --batch 1 --single-step-peer 0 --new-tokens 128 --out $OUT/int4default.json > $OUT/int4default.log 2>&1
echo "int4 default head rc $? at ${SECONDS}s"; python3 bench/results/table_summary.py $OUT/int4default.json 2>&1 | tail -3
(cd $OUT && tar czf /tmp/call.tgz . && rm -rf ./* && mv /tmp/call.tgz .)
