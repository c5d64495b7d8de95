# Written in session 32 for the next session with an H100 (one call, ~320 s of running; a start costs ~150-180 s more):
# (1) chunked prefill with the chunk layer now compiled (8B, bf16, a 3,072-token prompt, chunks of 512; turn
#     prefill_chunk on if the long prompt's first token is no longer much later than one forward's);
# (2) int4 with the lm_head quantized too (--quant-lm-head; the H100 table has no head shape, so the head runs the
#     untabled GEMM_W rule) against bf16 at batch 1: the 2.5x line with a build's quant.quantize_lm_head;
# (3) the untabled rule against the tinygemm it replaced (s32-call5.sh: the card's table removed; last, as it
#     deletes the table in this copy of the tree). Needs .devq/old (git archive 45f0959 lorafast_export
#     bench/torch_bench.py bench/__init__.py scripts | tar -x -C .devq/old). Pass LIMIT= the seconds it may run.
source bench/results/device_env.sh || exit 3
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 100 python3 bench/torch_bench.py --device cuda --shape llama3-8b --sections longprompt --long-prompt-len 3072 --long-chunk 512 --long-running 4 --new-tokens 128 --max-seq-len 4096 --out $OUT/long512.json > $OUT/long512.log 2>&1
echo "chunk 512 rc $? at ${SECONDS}s"; grep -E "longprompt|rror" $OUT/long512.log | cut -c1-600
timeout 90 python3 bench/torch_bench.py --device cuda --shape llama3-8b --sections bf16,int4 --batch 1 --quant-lm-head --single-step-peer 0 --new-tokens 128 --out $OUT/head.json > $OUT/head.log 2>&1
echo "quantized head rc $? at ${SECONDS}s"; python3 bench/results/table_summary.py $OUT/head.json 2>&1 | tail -4
LIMIT=$((${LIMIT:-590} - SECONDS)) bash bench/results/s32-call5.sh
