# Session 28 call 4: call 3's runs again after its failure (the lm_head's tensor-core config asked for 239,616 bytes of
# shared memory with x + delta staged; now 4 stages): bf16 at batch 1 and 4, fused_decode auto against mma, then
# specwide with mma.
source bench/results/device_env.sh || exit 3
nvidia-smi --query-gpu=name --format=csv,noheader
for i in 1 2; do
  for v in mma auto; do
    [ $SECONDS -lt 200 ] || break 2
    timeout 120 python3 bench/torch_bench.py --device cuda --shape llama3-8b --sections copy,bf16 --batch 1,4 --eager-peer 0 --fused-decode $v --out $OUT/ab-$v-$i.json > $OUT/ab-$v-$i.log 2>&1
    echo "$v $i rc $? at ${SECONDS}s"; python3 bench/results/decode_rows.py $OUT/ab-$v-$i.json; grep -o '"error": "[^"]*' $OUT/ab-$v-$i.log | head -2
  done
done
[ $((${LIMIT:-590} - SECONDS)) -gt 80 ] && timeout $((${LIMIT:-590} - 10 - SECONDS)) python3 bench/torch_bench.py --device cuda --shape llama3-8b --sections specwide --spec-k 2,4 --new-tokens 128 --spec-repeats 1 --spec-profile on --fused-decode mma --out $OUT/specmma.json > $OUT/specmma.log 2>&1
echo "specwide mma rc $? at ${SECONDS}s"; grep -E "profile:|specwide k|alone:|error" $OUT/specmma.log | cut -c1-260
(cd $OUT && tar czf /tmp/call.tgz . && rm -rf ./* && mv /tmp/call.tgz .)
