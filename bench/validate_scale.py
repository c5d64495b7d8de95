"""Validation at scale (issue 13): how long the validate stage takes next to the rest of a build, its peak host
RSS and peak GPU memory, on models made by scripts/make_model.py.

    python bench/validate_scale.py ratio --model demo --model 30m              # CPU: --quant gptq --target onnxruntime
    python bench/validate_scale.py ratio --model demo --warm                   # the same, reference cache warm
    python bench/validate_scale.py ratio --model demo --new-adapter            # another adapter on a cached base
    python bench/validate_scale.py build --preset tinyllama-1.1b --dtype float16 --quant rtn --target hf \\
        --max-tokens 256                                                       # CPU: peak RSS
    python bench/validate_scale.py build --base /work/big/13b/base --adapter /work/big/13b/lora --quant rtn \\
        --target hf --max-tokens 256                                           # larger than RAM
    python bench/validate_scale.py build --preset llama3-8b --quant awq --target trt-llm --json-out R.json
                                                                               # H200: model made on the GPU

The 30m model is scripts/make_model.py's preset (random fp16 weights, 10 layers, made afresh in each run), not a
trained fixture. Every build runs `lorafast-export build ... --no-cache` in a fresh process with a fresh
LORAFAST_CACHE (cold caches), sampling its peak RSS (VmHWM, every 0.2 s) and, where there is a GPU, the device's used memory
(nvidia-smi, every 0.5 s: CUDA context included). Stage times come from the artifact's manifest.json. The load
average is printed next to CPU times: the development machine is shared. Results: bench/VALIDATION.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.make_model import PRESETS, make_adapter, make_base, shape_of  # noqa: E402

DEMO = ROOT / "lorafast_export" / "data" / "demo"
TRACE_EVERY_S = 10  # current and peak RSS / GPU memory, printed while a build runs


class Sampler:
    """Peak VmHWM of one process and peak used GPU memory (all processes) while it runs."""

    def __init__(self, pid: int, t0: float):
        self.pid, self.rss_kb, self.gpu_mib, self.gpu_now, self.done, self.t0 = pid, 0, 0, 0, False, t0
        self.gpu = shutil.which("nvidia-smi") is not None
        self.threads = [threading.Thread(target=self._rss, daemon=True)]
        if self.gpu:
            self.threads.append(threading.Thread(target=self._gpu, daemon=True))
        for t in self.threads:
            t.start()

    def _rss(self) -> None:
        shown, now_kb = time.perf_counter(), 0
        while not self.done:
            if (
                time.perf_counter() - shown > TRACE_EVERY_S
            ):  # a trace to set beside the build's progress lines
                shown = time.perf_counter()
                print(f"[sampler {shown - self.t0:.0f} s] RSS {now_kb / 1e6:.2f} GB (peak {self.rss_kb / 1e6:.2f}), "
                      f"GPU used {self.gpu_now} MiB (peak {self.gpu_mib})", flush=True)  # fmt: skip
            try:
                for line in open(f"/proc/{self.pid}/status"):
                    if line.startswith("VmHWM:"):
                        self.rss_kb = max(self.rss_kb, int(line.split()[1]))
                    elif line.startswith("VmRSS:"):
                        now_kb = int(line.split()[1])
            except (FileNotFoundError, ProcessLookupError):
                return
            time.sleep(0.2)

    def _gpu(self) -> None:
        q = ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"]
        while not self.done:
            try:
                used = subprocess.run(q, capture_output=True, text=True, timeout=10).stdout.split()
                self.gpu_now = max(int(x) for x in used)
                self.gpu_mib = max(self.gpu_mib, self.gpu_now)
            except (subprocess.SubprocessError, ValueError):
                pass
            time.sleep(0.5)

    def stop(self) -> None:
        self.done = True
        for t in self.threads:
            t.join(timeout=15)


def run_build(args: list[str], out: Path, log_path: Path | None = None, cache: Path | None = None) -> dict:
    """One `build --out out` in a fresh process with cold caches (or `cache`, kept: a warm reference cache):
    wall, peak RSS and GPU, and the stage times from the artifact's manifest. Its stderr (one progress line per
    stage and sub-step) goes to log_path, which therefore says how far a build got even when the run is killed
    at a time limit."""
    keep = cache is not None
    cache = cache or Path(tempfile.mkdtemp(prefix="lf-cache-"))
    path = [
        str(ROOT),
        *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep)),
    ]  # keep carried wheels
    env = {**os.environ, "LORAFAST_CACHE": str(cache), "PYTHONPATH": os.pathsep.join(path)}
    cmd = [
        sys.executable,
        "-m",
        "lorafast_export.cli",
        "build",
        *args,
        "--out",
        str(out),
        "--no-cache",
        "--force",
    ]
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    with open(log_path or os.devnull, "w") as log:
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, env=env)
        sampler = Sampler(proc.pid, t0)
        proc.wait()
        sampler.stop()
    wall = time.perf_counter() - t0
    if not keep:
        shutil.rmtree(cache, ignore_errors=True)
    man = json.loads((out / "manifest.json").read_text()) if (out / "manifest.json").exists() else {}
    return {
        "cmd": " ".join(["lorafast-export", "build", *args]),
        "exit": proc.returncode,
        "wall_s": wall,
        "timings_s": man.get("timings_s", {}),
        "passed": man.get("passed"),
        "peak_rss_gb": sampler.rss_kb / 1e6,
        "peak_gpu_gb": sampler.gpu_mib * 2**20 / 1e9 if sampler.gpu else None,
        "load_avg": (load0, os.getloadavg()[0]),
    }


def report_facts(artifact: Path) -> dict:
    """The final stage's metrics and any validation note from the artifact's report.json."""
    p = artifact / "report.json"
    if not p.exists():
        return {}
    rep = json.loads(p.read_text())
    return {
        "stages": list(dict.fromkeys(s["name"] for s in rep["stages"])),
        "kl_mean": {f"{s['name']}/{s['eval_set']}": s["kl_mean"] for s in rep["stages"]},
        "greedy_match": {f"{s['name']}/{s['eval_set']}": s.get("greedy_match") for s in rep["stages"]},
        "vs_previous_kl": {
            f"{s['name']}/{s['eval_set']}": (s.get("vs_previous") or {}).get("kl_mean") for s in rep["stages"]
        },
        "notes": [
            n for n in (rep["artifact"].get("runtime_note"), rep["artifact"].get("validation_note")) if n
        ],
    }


def make_inputs(work: Path, preset: str, dtype: str, device: str | None) -> tuple[Path, Path, dict]:
    """A preset base + a LoRA r16 on every linear (scripts/make_model.py), made here and timed."""
    t0 = time.perf_counter()
    info = make_base(work / "base", shape_of(preset), dtype=dtype, device=device)
    make_adapter(work / "lora", work / "base", r=16, alpha=32, device=device)
    info["seconds"] = time.perf_counter() - t0
    return work / "base", work / "lora", info


def versions() -> str:
    import peft
    import torch
    import transformers

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu"
    return (
        f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"peft {peft.__version__}; {os.cpu_count()} cores; {gpu}"
    )


# ----------------------------------------------------------------------------------------------- commands


def cmd_ratio(a) -> list[dict]:
    """CPU: validate time vs the other stages of a `--quant gptq --target onnxruntime` build."""
    rows = []
    for model in a.model:
        with tempfile.TemporaryDirectory(prefix="lf-ratio-") as tmp:
            work = Path(tmp)
            if model == "demo":
                base, ad = DEMO / "base", DEMO / "lora"
            else:
                base, ad, _ = make_inputs(work, model, "float16", "cpu")
            out = work / "out"
            args = ["--base", str(base), "--adapter", str(ad), "--quant", "gptq", "--target", "onnxruntime"]
            log = (
                (lambda tag, m=model: Path(a.logs) / f"ratio-{m}{tag}.log") if a.logs else (lambda tag: None)
            )
            cache = work / "cache" if a.warm or a.new_adapter else None
            if (
                a.warm or a.new_adapter
            ):  # a first build fills the reference cache; the row is the second one's
                run_build(args, work / "first", log("-first"), cache)
            if a.new_adapter:  # the second build's adapter is another one on the same base (seed 2)
                args[3] = str(work / "lora2")
                make_adapter(work / "lora2", base, r=16, alpha=32, seed=2)
            tag = (
                " (warm reference cache)"
                if a.warm
                else " (another adapter, same base)"
                if a.new_adapter
                else ""
            )
            r = run_build(
                args, out, log("-warm" if a.warm else "-new-adapter" if a.new_adapter else ""), cache
            )
            r |= {"model": model + tag} | report_facts(out)
            t = r["timings_s"]
            other = sum(v for k, v in t.items() if k != "validate")
            r["ratio"] = t.get("validate", float("nan")) / other if other else float("nan")
            rows.append(r)
            print(json.dumps(r), flush=True)
    print("\n| model | validate s | other stages s | ratio | wall s | peak RSS GB | load avg | exit |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        t = r["timings_s"]
        other = sum(v for k, v in t.items() if k != "validate")
        print(
            f"| {r['model']} | {t.get('validate', float('nan')):.1f} | {other:.1f} | {r['ratio']:.2f} | "
            f"{r['wall_s']:.0f} | {r['peak_rss_gb']:.2f} | {r['load_avg'][0]:.1f}-{r['load_avg'][1]:.1f} | "
            f"{r['exit']} |"
        )
    return rows


def cmd_build(a) -> list[dict]:
    """One build with validation: timings per stage, peak RSS, peak GPU."""
    with tempfile.TemporaryDirectory(prefix="lf-build-", dir=a.workdir) as tmp:
        work = Path(tmp)
        made = None
        if a.preset:
            base, ad, made = make_inputs(work, a.preset, a.dtype, a.device)
            print(f"made {a.preset}: {made['bytes'] / 1e9:.1f} GB in {made['shards']} shards, "
                  f"{made['seconds']:.0f} s", flush=True)  # fmt: skip
        else:
            base, ad = Path(a.base), Path(a.adapter)
        out = work / "out"
        args = ["--base", str(base), "--adapter", str(ad), "--quant", a.quant, "--target", a.target]
        args += ["--max-tokens", str(a.max_tokens)] if a.max_tokens else []
        r = run_build(
            args + a.extra, out, Path(a.logs) / f"build-{a.target}-{a.quant}.log" if a.logs else None
        )
        r |= {"model": a.preset or str(base), "made": made, "versions": versions()} | report_facts(out)
    print(json.dumps(r), flush=True)
    t = r["timings_s"]
    print("\n| model | target | quant | " + " | ".join(f"{k} s" for k in t) + " | wall s | peak RSS GB | peak GPU GB |"
          " load avg | exit |")  # fmt: skip
    print("|---|---|---|" + "---:|" * (len(t) + 5))
    gpu = "—" if r["peak_gpu_gb"] is None else f"{r['peak_gpu_gb']:.1f}"
    print(
        f"| {r['model']} | {a.target} | {a.quant} | " + " | ".join(f"{v:.1f}" for v in t.values())
        + f" | {r['wall_s']:.0f} | {r['peak_rss_gb']:.2f} | {gpu} | {r['load_avg'][0]:.1f}-{r['load_avg'][1]:.1f}"
        f" | {r['exit']} |"
    )  # fmt: skip
    return [r]


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("ratio")
    r.add_argument("--model", action="append", default=[], help="demo or a scripts/make_model.py preset")
    r.add_argument(
        "--warm",
        action="store_true",
        help="time a second build that finds the first one's reference cache (no stage cache: --no-cache)",
    )
    r.add_argument(
        "--new-adapter",
        action="store_true",
        help="time a second build of another adapter on the same base (its bare-base log-probs cached by the first)",
    )
    b = sub.add_parser("build")
    b.add_argument("--preset", choices=list(PRESETS))
    b.add_argument("--dtype", default="bfloat16")
    b.add_argument("--device", default=None)
    b.add_argument("--base")
    b.add_argument("--adapter")
    b.add_argument("--quant", default="none")
    b.add_argument("--target", default="hf")
    b.add_argument("--max-tokens", type=int)
    b.add_argument("--workdir", default=None, help="where the model and artifact are written (default: /tmp)")
    b.add_argument("extra", nargs="*", help="more build flags, after --")
    for p in (r, b):
        p.add_argument("--logs", help="directory for each build's stdout/stderr")
        p.add_argument("--json-out", help="append the result rows (JSON lines) to this file")
    a = ap.parse_args()
    if a.logs:
        Path(a.logs).mkdir(parents=True, exist_ok=True)
    print(versions(), flush=True)
    rows = cmd_ratio(a) if a.cmd == "ratio" else cmd_build(a)
    if a.json_out:
        with open(a.json_out, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
