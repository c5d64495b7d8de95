"""The peer table of bench/QUANT.md from the results of many bench/quant_accuracy.py runs sharing one OUT.

    .venv/bin/python bench/quant_table.py /tmp/q30 [--pairs "ours gptq=nncf-gptq" ...]
    .venv/bin/python bench/quant_table.py /tmp/q30 --status --stride 4      # ours (defaults) vs each peer

Reads OUT/results-g{G}-s{S}-*.json (one file per row process, tagged as in bench/QUANT.md's command), prints one
table per group size and symmetry, rows ordered by method family, the best KL mean of each family in bold. A pair
"G/S:A=B" (group size, symmetric 0|1, row names) adds a paired comparison over the eval blocks from OUT/kl_tokens-*.pt: mean KL difference
± standard error over blocks, and the blocks where A is lower.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lorafast_export.specs import default_range_search  # noqa: E402

FAMILIES = ("rtn", "gptq", "awq-gptq", "awq")  # checked in order: a name's family is the first it ends with


def family(name: str) -> str:
    base = name.split(" (")[0].removeprefix("ours ")
    base = re.sub(
        r"-(search|nosearch|noclip|sym|static|act|onepass|natural|damp[\d.]+|se|awqscore|gptqscore|refit|norefit)\b",
        "",
        base,
    )
    for f in ("awq-gptq", "gptq", "awq", "rtn"):
        if base.endswith(f) or f"-{f}" in base or base == f:
            return f
    return "other"


def load(out: Path) -> dict[tuple[int, int], dict[str, dict]]:
    tables: dict[tuple[int, int], dict[str, dict]] = {}
    for f in sorted(out.glob("results-g*-s*-*.json")):
        r = json.loads(f.read_text())
        if r["eval"][0] * r["eval"][1] < 40000:  # quick looks (--eval-stride) are not table rows
            continue
        key = (r["group_size"], int(bool(r["symmetric"])))
        tables.setdefault(key, {}).update(r["results"])
    return tables


def strided_rows(out: Path, stride: int, block: int = 256) -> dict[tuple[int, int], dict[str, dict]]:
    """Every row, full or --eval-stride, scored on every `stride`-th eval block: a full row's per-token KL is cut
    to those blocks. KL mean / p99 and the quantization CPU seconds only (the per-token file holds KL alone)."""
    tables: dict[tuple[int, int], dict[str, dict]] = {}
    for f in sorted(out.glob("results-g*-s*-*.json")):
        r = json.loads(f.read_text())
        kls = torch.load(f.with_name(f.name.replace("results-", "kl_tokens-").replace(".json", ".pt")))
        full = r["eval"][0] * r["eval"][1] >= 40000
        for name, res in r["results"].items():
            kl = kls[name].view(-1, block)
            kl = (kl[::stride] if full else kl).flatten()
            key = (r["group_size"], int(bool(r["symmetric"])))
            row = {
                "kl_mean": float(kl.mean()),
                "kl_p99": float(torch.quantile(kl, 0.99)),
                "cpu_s": res["cpu_s"],
            }
            tables.setdefault(key, {})[name] = row
    return tables


def kl_by_block(out: Path, tag: str, name: str, block: int = 256, stride: int = 1) -> torch.Tensor | None:
    """Per-block mean KL of row `name` in the runs tagged g{G}-s{S} (tag), None if absent. stride > 1: on every
    stride-th eval block (a full row cut to them, or an --eval-stride row as it is). A name in several runs: the
    last file by name, as in load / strided_rows (a later session's tag re-runs the row)."""
    for f in sorted(out.glob(f"kl_tokens-{tag}-*.pt"), reverse=True):
        kls = torch.load(f)
        if name not in kls:
            continue
        full = kls[name].numel() >= 40000
        kl = kls[name].view(-1, block)
        if full or stride > 1:
            return (kl[::stride] if full else kl).mean(1)
    return None


# --status: our rows at today's defaults (bench/quant_accuracy.py names; the first present is used: rows run before
# a default changed carry the variant's name), by whether the range search is on at that group size
# (specs.default_range_search), and the peers they are compared with.
OURS_DEFAULT = {  # the scale refit is the default since session 10: its rows ("-refit") first
    True: {
        "gptq": ("ours gptq-refit", "ours gptq-search"),
        "awq": ("ours awq",),
        "awq-gptq": (
            "ours awq-gptq-refit",
            "ours awq-gptq-onepass",
            "ours awq-gptq-search",
            "ours awq-gptq-gptqscore-search",
        ),
    },
    False: {  # "ours gptq" / "ours awq-gptq": rows run before session 7, when the search was off by default
        "gptq": ("ours gptq-refit", "ours gptq-nosearch", "ours gptq"),
        "awq": ("ours awq",),
        "awq-gptq": (
            "ours awq-gptq-refit",
            "ours awq-gptq-onepass",
            "ours awq-gptq-nosearch",
            "ours awq-gptq",
        ),
    },
}


def paired(bx: torch.Tensor, by: torch.Tensor) -> str:
    """A vs B over the same blocks: KL ratio, A - B per block mean ± s.e., blocks where A is lower."""
    d = bx - by
    return (
        f"{float(bx.mean() / by.mean()):.3f}, {float(d.mean()):+.6f} ± {float(d.std() / d.numel() ** 0.5):.6f}, "
        f"{int((d < 0).sum())} / {d.numel()}"
    )


def status_tables(out: Path, stride: int) -> None:
    """One table per group size and symmetry: ours (defaults) and every peer, KL mean on every stride-th block; each
    peer against ours of its family (paired per block), and our combined method against the best other row."""
    tables = strided_rows(out, stride)
    for (g, s), rows in sorted(tables.items(), key=lambda kv: (-kv[0][0], kv[0][1])):
        tag = f"g{g}-s{s}"
        defaults = OURS_DEFAULT[default_range_search("gptq", g, None)]
        ours = {f: next((n for n in names if n in rows), None) for f, names in defaults.items()}
        peers = [n for n in rows if not n.startswith("ours ") and family(n) in defaults]
        if not peers and not any(ours.values()):
            continue
        block = {n: kl_by_block(out, tag, n, stride=stride) for n in [*filter(None, ours.values()), *peers]}
        print(f"\n**4-bit g{g}, {'symmetric' if s else 'asymmetric'}** ({stride}-th eval blocks)\n")
        print(
            "| method | row | KL mean | ours vs this row: KL ratio, ours - row per block ± s.e., blocks ours lower "
            "| quantize cpu s |\n|---|---|---|---|---|"
        )
        for f in defaults:
            names = [
                n for n in [ours[f], *sorted(peers, key=lambda n: rows[n]["kl_mean"])] if n and family(n) == f
            ]
            for n in names:
                vs = ""
                if n != ours[f] and ours[f] and block[n] is not None and block[ours[f]] is not None:
                    vs = paired(block[ours[f]], block[n])
                label = f"{n} (default)" if n == ours[f] else n
                print(f"| {f} | {label} | {rows[n]['kl_mean']:.6f} | {vs} | {rows[n]['cpu_s']:.0f} |")
        combined = ours["awq-gptq"]
        others = [n for n in block if n != combined and block[n] is not None]
        if combined and others and block[combined] is not None:
            best = min(others, key=lambda n: rows[n]["kl_mean"])
            print(f"\nours awq-gptq vs the best other row ({best}): {paired(block[combined], block[best])}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--pairs", nargs="*", default=[])
    ap.add_argument("--stride", type=int, default=1, help="every row on every k-th eval block (KL only)")
    ap.add_argument(
        "--status", action="store_true", help="bench/QUANT.md's status tables (ours vs each peer)"
    )
    a = ap.parse_args()
    if a.status:
        return status_tables(a.out, a.stride)
    tables = load(a.out) if a.stride == 1 else strided_rows(a.out, a.stride)
    for (g, s), rows in sorted(tables.items(), key=lambda kv: (-kv[0][0], kv[0][1])):
        print(f"\n**4-bit g{g}, {'symmetric' if s else 'asymmetric'}**\n")
        print(
            "| method | row | KL mean | KL p99 | same top-1 | ppl ratio | quantize cpu s |\n|---|---|---|---|---|---|---|"
        )
        order = sorted(
            rows,
            key=lambda n: (FAMILIES.index(family(n)) if family(n) in FAMILIES else 9, rows[n]["kl_mean"]),
        )
        best = {}
        for n in order:
            best.setdefault(family(n), rows[n]["kl_mean"])
        for n in order:
            r, kl = rows[n], f"{rows[n]['kl_mean']:.5f}"
            kl = f"**{kl}**" if r["kl_mean"] == best[family(n)] else kl
            top1, ppl = (f"{r['top1']:.3f}", f"{r['ppl_ratio']:.4f}") if "top1" in r else ("", "")
            print(f"| {family(n)} | {n} | {kl} | {r['kl_p99']:.4f} | {top1} | {ppl} | {r['cpu_s']:.0f} |")
    if a.pairs:
        print(
            "\n| group, symmetry | A vs B | KL ratio A / B | A - B per block, mean ± s.e. | blocks where A is lower |"
        )
        print("|---|---|---|---|---|")
    for pair in a.pairs:
        where, names = pair.split(":", 1)
        g, s = where.split("/")
        x, y = names.split("=")
        bx, by = (kl_by_block(a.out, f"g{g}-s{s}", n, stride=a.stride) for n in (x, y))
        if bx is None or by is None or bx.shape != by.shape:
            print(f"{pair}: per-token KL not found for both")
            continue
        d = bx - by
        print(
            f"| g{g} {'sym' if int(s) else 'asym'} | {x} vs {y} | {float(bx.mean() / by.mean()):.3f} | {float(d.mean()):+.5f} ± {float(d.std() / d.numel() ** 0.5):.5f} | {int((d < 0).sum())} / {d.numel()} |"
        )


if __name__ == "__main__":
    main()
