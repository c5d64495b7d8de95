# Session 27 call 1: the CUDA tests of every kernel option still off by default (fused_pdl's dense fused ops and
# final norm + head as programmatic dependent launches; triton_argmax; attn_last_merges, run eagerly, with PDL and
# from CUDA graphs replayed three times), then bf16 and int4 at batch 1 (llama3-8b shape, random weights), three
# variants interleaved twice: plain (all three off), pdl (fused_pdl on), all (fused_pdl + triton_argmax +
# attn_last_merges on).
source bench/results/device_env.sh || exit 3
timeout 240 python3 -m pytest -q -rs -p no:cacheprovider tests/runtime/test_triton_fused.py tests/runtime/test_triton_attention.py tests/runtime/test_triton_argmax.py > $OUT/cuda_tests.txt 2>&1
echo "fused + attention + argmax tests rc $? at ${SECONDS}s" | tee -a $OUT/cuda_tests.txt
timeout 150 python3 -m pytest -q -rs -p no:cacheprovider tests/runtime/test_cuda_int4.py -k "pdl or dependent or fused_mma" >> $OUT/cuda_tests.txt 2>&1
echo "int4 pdl tests rc $? at ${SECONDS}s" | tee -a $OUT/cuda_tests.txt; grep -E "passed|failed|SKIP|Error" $OUT/cuda_tests.txt | tail -8
for i in 1 2; do
  for v in plain pdl all; do
    [ $SECONDS -lt 500 ] || break 2
    p=$([ $v = plain ] && echo off || echo on); x=$([ $v = all ] && echo on || echo off)
    timeout $((590 - SECONDS)) python3 bench/torch_bench.py --device cuda --shape llama3-8b --sections copy,bf16,int4 --batch 1 --eager-peer 0 --fused-pdl $p --triton-argmax $x --attn-last-merges $x --out $OUT/ab-$v-$i.json > $OUT/ab-$v-$i.log 2>&1
    echo "$v $i rc $? at ${SECONDS}s"; python3 bench/results/decode_rows.py $OUT/ab-$v-$i.json
  done
done
