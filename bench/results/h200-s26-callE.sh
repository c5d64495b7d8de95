# Session 26 call E (not run in session 26: no device was lent): the paged decode attention as one kernel whose
# last split program merges (runtime option attn_last_merges). Its CUDA tests (bit for bit against the two-kernel
# path, eagerly, with PDL and from CUDA graphs replayed three times, the counters back at 0), then bf16 and int4 at
# batch 1, interleaved off / on / off / on.
source bench/results/device_env.sh || exit 3
timeout 180 python3 -m pytest -q -rs -p no:cacheprovider tests/runtime/test_triton_attention.py > $OUT/cuda_tests.txt 2>&1
echo "attention tests rc $? at ${SECONDS}s" | tee -a $OUT/cuda_tests.txt; grep -E "passed|failed|SKIP|Error" $OUT/cuda_tests.txt | tail -4
for i in 1 2; do
  for v in off on; do
    [ $SECONDS -lt 470 ] || break 2
    timeout $((585 - SECONDS)) python3 bench/torch_bench.py --device cuda --shape llama3-8b --sections bf16,int4 --batch 1 --eager-peer 0 --attn-last-merges $v --out $OUT/merge-$v-$i.json > $OUT/merge-$v-$i.log 2>&1
    echo "attn_last_merges $v $i rc $? at ${SECONDS}s"; python3 bench/results/decode_rows.py $OUT/merge-$v-$i.json
  done
done
