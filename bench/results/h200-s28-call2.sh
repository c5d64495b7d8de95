# Session 28 call 2: can a tensor-core bf16 product over a fixed 16-row tile decode one row as fast as the fused FMA
# kernels? (bench/mma_dense_probe.py: every 8B linear and the lm_head at 1, 3 and 5 rows; cuBLAS, the fused op's
# plain GEMV at its shipped tile, and the probe's split-K wgmma kernel over its configs; rows bitwise checked.)
source bench/results/device_env.sh || exit 3
nvidia-smi --query-gpu=name --format=csv,noheader
timeout ${LIMIT:-400} python3 bench/mma_dense_probe.py --rows 1,3,5 --out $OUT/probe.json > $OUT/probe.log 2>&1
echo "probe rc $? at ${SECONDS}s"; grep -E "^\|" $OUT/probe.log; tail -3 $OUT/probe.log | cut -c1-300
