"""Larger than memory: merge (+ int8 / RTN int4 quantization) of a 13B-shaped fp16 Llama on a 24 GB machine.

    python bench/large_model.py --workdir /tmp/big [--layers 40] [--keep]

Generates a random fp16 Llama-2-13B-shaped checkpoint (40 layers, hidden 5120, ~26 GB; scripts/make_model.py) in
about 1-layer shards plus a rank-16 LoRA on q/v/down, then runs `lorafast-export merge` and `build --quant int8|rtn --target hf` in fresh
processes, sampling each process's peak RSS (VmHWM) and wall time. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from scripts.make_model import make_adapter, make_base, shape_of  # noqa: E402


def generate(root: Path, layers: int) -> tuple[Path, Path, float]:
    """The 13B shape in fp16 from scripts/make_model.py, about one layer per shard, + LoRA r16 on q/v/down."""
    info = make_base(root / "base", shape_of("llama-13b", layers=layers), dtype="float16", shard_gb=0.7)
    make_adapter(root / "lora", root / "base", r=16, alpha=32, targets=("q_proj", "v_proj", "down_proj"))
    return root / "base", root / "lora", info["bytes"] / 1e9


def peak_rss_run(cmd: list[str]) -> tuple[float, float, int]:
    """(peak RSS GB from /proc VmHWM sampled until exit, wall s, return code)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = [0]

    def poll():
        while proc.poll() is None:
            try:
                for line in open(f"/proc/{proc.pid}/status"):
                    if line.startswith("VmHWM:"):
                        peak[0] = max(peak[0], int(line.split()[1]))
            except FileNotFoundError:
                break
            time.sleep(0.2)

    t = threading.Thread(target=poll)
    t.start()
    _, err = proc.communicate()
    t.join()
    if proc.returncode:
        print(err[-3000:], file=sys.stderr)
    return peak[0] / 1e6, time.perf_counter() - t0, proc.returncode


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="/tmp/lorafast-big")
    ap.add_argument("--layers", type=int, default=40)
    ap.add_argument("--methods", default="int8,rtn")
    ap.add_argument(
        "--keep", action="store_true", help="keep the generated checkpoint (and reuse a kept one)"
    )
    ap.add_argument("--generate-only", action="store_true")
    a = ap.parse_args()
    root = Path(a.workdir)
    cli = [sys.executable, "-m", "lorafast_export.cli", "-q"]
    t0 = time.perf_counter()
    index = root / "base" / "model.safetensors.index.json"
    if (
        a.keep and index.exists() and (root / "lora" / "adapter_config.json").exists()
    ):  # reuse a kept checkpoint
        base, ad = root / "base", root / "lora"
        gb = json.loads(index.read_text())["metadata"]["total_size"] / 1e9
        rows = [("reuse kept checkpoint", gb, None, time.perf_counter() - t0, 0)]
    else:
        base, ad, gb = generate(root, a.layers)
        rows = [("generate checkpoint", gb, None, time.perf_counter() - t0, 0)]
    if a.generate_only:
        return
    rss, wall, rc = peak_rss_run(
        [*cli, "merge", "--base", str(base), "--adapter", str(ad), "--out", str(root / "merged"), "--force"]
    )
    rows.append(("merge (LoRA r16 on q/v/down)", gb, rss, wall, rc))
    shutil.rmtree(root / "merged", ignore_errors=True)
    for m in [x for x in a.methods.split(",") if x]:
        rss, wall, rc = peak_rss_run(
            [
                *cli,
                "build",
                "--base",
                str(base),
                "--adapter",
                str(ad),
                "--target",
                "hf",
                "--quant",
                m,
                "--no-validate",
                "--no-cache",
                "--force",
                "--out",
                str(root / f"q-{m}"),
            ]
        )
        rows.append((f"merge + {m} + hf checkpoint", gb, rss, wall, rc))
        shutil.rmtree(root / f"q-{m}", ignore_errors=True)
    print("| step | model GB (fp16) | peak RSS GB | wall s | exit |\n|---|---:|---:|---:|---:|")
    for name, size, peak, wall, rc in rows:
        print(f"| {name} | {size:.1f} | {'—' if peak is None else f'{peak:.2f}'} | {wall:.0f} | {rc} |")
    if not a.keep:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
