# Session 10 lead call D: retrain the 30M quantization fixture (deterministic on this device), ship it back in
# 4 gzip chunks; then the cuBLAS / cuBLASLt per-linear table and a cuBLASLt step profile (bf16 batch 1).
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 3
echo "main $(cat .devq/commit)"
timeout 300 python3 scripts/train_fixture.py --out /tmp/fx/quant30m > $OUT/train_fixture.log 2>&1
echo "train rc $? at ${SECONDS}s"; tail -12 $OUT/train_fixture.log; cat /tmp/fx/quant30m/TRAINING.md | tail -20
(cd /tmp/fx && tar cf - quant30m | gzip -6 > /tmp/fx.tgz) && sha256sum /tmp/fx.tgz && split -b 15m -d /tmp/fx.tgz $OUT/fx.tgz.part && ls -la $OUT
echo "[$SECONDS s] blas + profile bf16lt"
timeout $((590 - SECONDS)) python3 bench/torch_bench.py --device cuda --shape llama3-8b --sections blas,profile --profile bf16,bf16lt --batch 1 --new-tokens 64 --out $OUT/torch_h200_s10_blas.json > $OUT/torch_h200_s10_blas.log 2>&1
echo "blas rc $? at ${SECONDS}s"; grep -v Warn $OUT/torch_h200_s10_blas.log | grep -v "^\s*$" | cut -c1-700 | tail -30
