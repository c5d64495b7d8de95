# Session 33, call 3 (an H100): the chunked long prompt's host side (call 2: 172.6 ms wall against 115.8 ms of GPU
# kernels, one forward 88.9 against 80.7): the host's milliseconds in each prefill / chunk / decode call of the
# arrival, unprofiled, and the profiled pass's top host ops, chunks of 512 and 1,024. Pass LIMIT=.
source bench/results/device_env.sh || exit 3
nvidia-smi --query-gpu=name --format=csv,noheader
for c in 512 1024; do
timeout 140 python3 bench/torch_bench.py --device cuda --shape llama3-8b --sections longprompt --long-prompt-len 3072 --long-chunk $c --long-running 4 --new-tokens 128 --max-seq-len 4096 --long-profile --out $OUT/longhost$c.json > $OUT/longhost$c.log 2>&1
echo "longprompt $c rc $? at ${SECONDS}s"; grep -E "longprompt chunk|host" $OUT/longhost$c.log | cut -c1-400; grep -o '"chunk_[0-9]*": {[^}]*}' $OUT/longhost$c.json
done
(cd $OUT && tar czf /tmp/call.tgz . && rm -rf ./* && mv /tmp/call.tgz .)
