# Session 25 call B (not run in session 25: no device was lent; for after call A, if `fused_pdl` gained there):
# issue 15's whole table in one process with the runtime option fused_pdl on, as session 24's call C ran it
# (copy, bf16 and int4 at batch 1 and 32, the mixed workload's first pass, end to end against transformers' static
# cache + compile, 5 pairs, the 8B and the trained demo's speculative rows), after the device-guard and warm-up
# CUDA tests: that script itself, its table command given `--fused-pdl on` and 90 s less; then a per-kernel profile
# of one decode step at batch 1, bf16 and int4, with the option on.
set -u
export PYTHONUNBUFFERED=1
sed -e 's/--e2e-repeats 5 --out/--e2e-repeats 5 --fused-pdl on --out/' -e 's/590 - SECONDS/500 - SECONDS/' \
  bench/results/h200-s24-callC.sh > /tmp/h200-s25-callB-table.sh
grep -q -- "--fused-pdl on" /tmp/h200-s25-callB-table.sh || exit 5
bash /tmp/h200-s25-callB-table.sh
export PYTHONPATH=/tmp/site:$PWD
timeout $((590 - SECONDS)) python3 bench/torch_bench.py --device cuda --shape llama3-8b --sections profile --profile bf16,int4 --batch 1 --fused-pdl on --out $OUT/profile.json > $OUT/profile.log 2>&1
echo "profile rc $? at ${SECONDS}s"; grep -E "^\[" $OUT/profile.log | cut -c1-300
