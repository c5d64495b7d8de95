"""Peak memory of the streaming merge vs model size.

    python bench/merge_memory.py --layers 48 --hidden 512 [--shard-mb 64]

Builds a deep random Llama checkpoint + a LoRA on every linear, merges it in a fresh process, and prints the peak
anonymous RSS above the post-import baseline (file-backed mmap pages are page cache and excluded) against the
checkpoint size and one layer's size.
"""

from __future__ import annotations

import argparse
import threading

from lorafast_export.testing import measure


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--inter", type=int, default=1376)
    ap.add_argument("--shard-mb", type=int, default=64)
    a = ap.parse_args()
    r = measure(a.layers, a.hidden, a.inter, a.shard_mb)
    print("| layers | model MB | one layer MB | shard MB | peak extra RSS MB | wall s |")
    print("|---:|---:|---:|---:|---:|---:|")
    print(
        f"| {r['layers']} | {r['model_mb']:.0f} | {r['layer_mb']:.1f} | {r['shard_mb']} | "
        f"{r['peak_delta_mb']:.0f} | {r['wall_s']:.1f} |"
    )


if __name__ == "__main__":
    threading.stack_size(0)
    main()
