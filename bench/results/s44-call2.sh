# Session 44, call 2 (H100): a shape without a kernel table (torch_bench's "llama2-7b": every fused op's width but
# o_proj's is untabled), which fused_decode auto runs on the tensor cores at one row on an H100 since session 43,
# with MMA_DEFAULT now (64, 256, 1, 4, 4). (1) Batch-1 decode with fused_decode on (the CUDA-core kernels,
# DEFAULT_TILES) against mma (MMA_DEFAULT), 3 interleaved runs, the tokens compared (fused section, mma-shipped:
# its op rows time MMA_DEFAULT alone). (2) With time left, the ops alone at 1 and 4 rows over the tensor-core grid
# (the old default (64, 128, 1, 4, 3) among it).
source bench/results/device_env.sh || exit 3
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 400 python3 bench/torch_bench.py --device cuda --shape llama2-7b --sections fused --fused-tiles mma-shipped --fused-batches 1 --new-tokens 128 --out $OUT/e2e.json > $OUT/e2e.log 2>&1
echo "e2e rc $? at ${SECONDS}s"
grep -E "fused op|fused batch|rror" $OUT/e2e.log | cut -c1-700
REM=$((570 - SECONDS))
if (( REM > 60 )); then
  timeout $REM python3 bench/torch_bench.py --device cuda --shape llama2-7b --sections fused --fused-tiles mma-sweep --fused-e2e 0 --gemv-budget-s $((REM - 45)) --out $OUT/sweep.json > $OUT/sweep.log 2>&1
  echo "sweep rc $? at ${SECONDS}s"
  python3 - <<'PY'
import json, os
d = json.load(open(os.path.join(os.environ["OUT"], "sweep.json")))
f = d.get("fused") or d.get("sections", {}).get("fused", {})
for r in f.get("ops", []):
    t = {k: v.get("us") for k, v in r["tiles"].items()}
    print(f'{r["op"]:>28} rows {r["rows"]}: best {r.get("best")} {r.get("best_us", 0):.1f} us, '
          f'default 64x256x1x4x4 {t.get("64x256x1x4x4")}, old 64x128x1x4x3 {t.get("64x128x1x4x3")}, cuBLAS {r["cublas_us"]:.1f}')
PY
fi
