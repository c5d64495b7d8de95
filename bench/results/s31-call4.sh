# Session 31, call 4 (any GPU; written for the next session with a device): chunked prefill (runtime option
# prefill_chunk, off until this is timed) against one-forward prefill at the 8B shape: 4 requests decode while a
# 3,072-token prompt arrives; the running requests' longest wait between tokens and the long prompt's time to first
# token, chunks of 512 and 1024 (torch_bench section longprompt, each mode twice, interleaved; tokens compared).
# Pass LIMIT= the seconds it may run.
source bench/results/device_env.sh || exit 3
nvidia-smi --query-gpu=name --format=csv,noheader
for c in 512 1024; do
  timeout $(((${LIMIT:-590} - 10 - SECONDS) / 2)) python3 bench/torch_bench.py --device cuda --shape llama3-8b --sections longprompt --long-prompt-len 3072 --long-chunk $c --long-running 4 --new-tokens 128 --max-seq-len 4096 --out $OUT/long$c.json > $OUT/long$c.log 2>&1
  echo "chunk $c rc $? at ${SECONDS}s"; grep -E "longprompt|rror" $OUT/long$c.log | cut -c1-600
done
(cd $OUT && tar czf /tmp/call.tgz . && rm -rf ./* && mv /tmp/call.tgz .)
