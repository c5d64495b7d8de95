# Session 38, call 4, by card. H200: the CUDA tests of session 38's kernels, then s38-call1.sh's H200 branch (the
# int8 head into the H200's int8 table, issue 15's table with the profile). Other cards: s38-call3.sh (the tests,
# and the A/B of session 38's two decode-step changes). Pass LIMIT=.
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader)
if [[ "$GPU" == *H200* ]]; then
  source bench/results/device_env.sh || exit 3
  timeout 150 python3 -m pytest -q -p no:cacheprovider tests/runtime/test_triton_fused.py tests/runtime/test_model.py -k "add_rms_norm or norm_kernel or rope_table or runtime_with_fused" > $OUT/cuda_tests.txt 2>&1
  echo "tests rc $? at ${SECONDS}s"; tail -2 $OUT/cuda_tests.txt
  LIMIT=$(( ${LIMIT:-590} - SECONDS )) bash bench/results/s38-call1.sh
else
  bash bench/results/s38-call3.sh
fi
