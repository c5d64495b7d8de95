"""Quantization time alone (no evaluation) of our methods on a merged checkpoint, for a quiet machine.

    .venv/bin/python bench/quant_time.py --out /tmp/q30 --methods gptq awq awq-gptq --repeat 2 [--symmetric 0]

OUT is a bench/quant_accuracy.py output directory: its merged checkpoint and calib_ids.pt (the same calibration
ids as the accuracy rows). Prints wall and process CPU seconds of each quantize_checkpoint call, all threads
torch uses (set OMP_NUM_THREADS to pin them), and the load average before and after. Idle OpenMP threads sleep
(OMP_WAIT_POLICY=PASSIVE unless set), as under the CLI.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the CLI sets it (before torch starts OpenMP)

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.quant_accuracy import our_config  # noqa: E402
from lorafast_export.quant.walk import quantize_checkpoint  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--methods", nargs="+", default=["gptq", "awq", "awq-gptq"])
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--symmetric", type=int, choices=[0, 1])
    ap.add_argument("--repeat", type=int, default=1)
    a = ap.parse_args()
    calib = torch.load(a.out / "calib_ids.pt")
    sym = None if a.symmetric is None else bool(a.symmetric)
    print(f"torch threads {torch.get_num_threads()}, calib {tuple(calib.shape)}, load {os.getloadavg()}")
    print("| method | symmetric | wall s | cpu s |\n|---|---|---|---|")
    for m in a.methods:
        for _ in range(a.repeat):
            qc = our_config(m, a.bits, a.group_size, sym)
            t0, c0 = time.perf_counter(), time.process_time()
            quantize_checkpoint(a.out / "merged", qc, calib_ids=calib)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            print(f"| {m} | {qc.symmetric} | {wall:.1f} | {cpu:.1f} |", flush=True)
    print(f"load {os.getloadavg()}")


if __name__ == "__main__":
    main()
