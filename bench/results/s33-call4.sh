# Session 33, call 4 (an H100): chunked prefill at 8B with the compiled chunk layer, the sizes a default could take:
# a 8,192-token prompt in chunks of 1,024 and 2,048 and a 3,072-token one in chunks of 2,048, each against one
# forward, 4 requests decoding meanwhile (calls 1-3: at 3,072 tokens, chunks of 512 cost the long prompt 1.6-2.1x
# its one-forward first token, chunks of 1,024 1.16x, the host's ~25 ms a chunk call then above the GPU's time).
source bench/results/device_env.sh || exit 3
nvidia-smi --query-gpu=name --format=csv,noheader
for lc in 8192:1024 8192:2048 3072:2048; do L=${lc%:*}; C=${lc#*:}
timeout 120 python3 bench/torch_bench.py --device cuda --shape llama3-8b --sections longprompt --long-prompt-len $L --long-chunk $C --long-running 4 --new-tokens 64 --max-seq-len $((L + 256)) --out $OUT/long${L}_$C.json > $OUT/long${L}_$C.log 2>&1
echo "longprompt $L/$C rc $? at ${SECONDS}s"; grep -o '"chunk_[0-9]*": {[^}]*}\|"tokens_equal": [a-z]*' $OUT/long${L}_$C.json; grep -iE "error|Traceback" $OUT/long${L}_$C.log | head -3
done
(cd $OUT && tar czf /tmp/call.tgz . && rm -rf ./* && mv /tmp/call.tgz .)
