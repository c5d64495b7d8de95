# Session 31, call 1: whichever card comes. An H200 runs h200-s29-callE.sh (fused_decode auto's 2-8 rows there,
# speculative with mma and overlap_rounds); an H100 runs h100-s30-callA2.sh (specwide on call A's tuned int4 table).
# Pass LIMIT= the seconds the call may run.
case "$(nvidia-smi --query-gpu=name --format=csv,noheader)" in
  *H200*) bash bench/results/h200-s29-callE.sh ;;
  *) bash bench/results/h100-s30-callA2.sh ;;
esac
