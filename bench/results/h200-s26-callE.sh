# Session 26 call E (not run in session 26: no device was lent): two options that each remove a kernel from a decode
# step, off until timed. triton_argmax: the greedy argmax as two small Triton kernels instead of torch's one-block
# reduce (0.03 ms of an 8B step). attn_last_merges: the paged decode attention as one kernel whose last split program
# merges (the merge kernel: 1.5 us a layer). Their CUDA tests first (the attention's: bit for bit against the
# two-kernel path, eagerly, with PDL and from CUDA graphs replayed three times, the counters back at 0), then bf16
# and int4 at batch 1: plain, argmax, merges, interleaved twice.
source bench/results/device_env.sh || exit 3
timeout 180 python3 -m pytest -q -rs -p no:cacheprovider tests/runtime/test_triton_attention.py tests/runtime/test_triton_argmax.py > $OUT/cuda_tests.txt 2>&1
echo "attention + argmax tests rc $? at ${SECONDS}s" | tee -a $OUT/cuda_tests.txt; grep -E "passed|failed|SKIP|Error" $OUT/cuda_tests.txt | tail -4
for i in 1 2; do
  for v in plain argmax merges; do
    [ $SECONDS -lt 480 ] || break 2
    flags="--triton-argmax $([ $v = argmax ] && echo on || echo off) --attn-last-merges $([ $v = merges ] && echo on || echo off)"
    timeout $((585 - SECONDS)) python3 bench/torch_bench.py --device cuda --shape llama3-8b --sections bf16,int4 --batch 1 --eager-peer 0 $flags --out $OUT/ab-$v-$i.json > $OUT/ab-$v-$i.log 2>&1
    echo "$v $i rc $? at ${SECONDS}s"; python3 bench/results/decode_rows.py $OUT/ab-$v-$i.json
  done
done
