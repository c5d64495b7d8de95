# Session 34, call 1: whichever card comes. On an H200, s33-call1.sh (int4 with the lm_head quantized against bf16
# at batch 1, then issue 15's table); on an H100, s33-next-h100.sh (the chunked default after session 33's fixes;
# tune-kernels with the head; the quantized head on that table). Pass LIMIT=.
case "$(nvidia-smi --query-gpu=name --format=csv,noheader)" in
*H200*) LIMIT=${LIMIT:-590} bash bench/results/s33-call1.sh ;;
*) LIMIT=${LIMIT:-590} bash bench/results/s33-next-h100.sh ;;
esac
