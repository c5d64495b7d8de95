"""Print the profile section of a torch_bench --out JSON (per profiled runtime: wall and GPU time of a step, kernels a
step, the time by group, the 12 costliest kernels): `python3 bench/results/profile_summary.py table.json`."""

import json
import sys

for name, v in json.load(open(sys.argv[1])).get("profile", {}).items():
    if not isinstance(v, dict) or "top" not in v:
        continue
    print(
        name,
        "wall ms",
        round(v["wall_ms_per_step"], 3),
        "gpu us",
        round(v["gpu_us_per_step"], 1),
        "kernels",
        v["kernels_per_step"],
    )
    print("  groups", {g: round(u, 1) for g, u in v["groups_us"].items()})
    for t in v["top"][:12]:
        print("  ", json.dumps(t)[:160])
