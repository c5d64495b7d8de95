"""Measure the int4 kernel table the runtime reads at load (runtime/int4_table.py), on the GPU it serves.

    PYTHONPATH=. python bench/int4_kernels.py --shapes llama3-8b,demo --out int4_h200.json

For each fused linear shape of a model ([N, K]: qkv, o, gate_up, down) and each row bucket, it times the
dense bf16 matmul, torch's tinygemm (where it applies, up to 64 rows), our Triton GEMV / GEMM on qform's
packing (a grid of tiles, or with --reuse-old the shipped table's entry per cell) and the tiled-layout
GEMV_T / GEMM_T over a grid of tiles, options and split counts (every timing kept under 'all'), on RTN
int4 g128 asymmetric codes of a random weight. Row buckets run in the order of --rows, every shape per
bucket, so --budget-s cuts the least important buckets. Every call is replayed from a CUDA
graph, as the runtime's decode step runs it, so launch overhead is not counted, and consecutive calls read
different copies of the weight (256 MB in all), as consecutive layers do, so none is served from L2. Every Triton config is
also checked against the dequantized matmul; a config that fails is recorded and never chosen. Copy the
output to lorafast_export/data/kernels/int4_<gpu>.json (the file name comes from the GPU's name).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lorafast_export.qform import dequantize, pack_nibbles  # noqa: E402
from lorafast_export.quant.rtn import quantize_rtn  # noqa: E402
from lorafast_export.runtime.cuda_int4 import MAX_ROWS, SUBA, SUBX, pack_frags  # noqa: E402
from lorafast_export.runtime.int4_table import load_table, table_file  # noqa: E402
from lorafast_export.runtime.linear import Int4Linear, tinygemm_fits  # noqa: E402
from lorafast_export.runtime.triton_int4 import (  # noqa: E402
    DEQUANT,
    GEMM,
    GEMM_T,
    GEMM_W,
    GEMV,
    GEMV_T,
    GEMV_W,
    MMA,
    launch,
    pack_scale_zero,
    pack_tiles,
    pack_words,
)

MODELS = {  # hidden, intermediate, heads, kv heads, head dim
    "llama3-8b": (4096, 14336, 32, 8, 128),
    "demo": (256, 688, 4, 2, 64),
    "tiny": (128, 160, 2, 1, 32),  # --quick dry runs on the CPU (Triton's interpreter)
}
ACT_DTYPE = {"cuda": torch.bfloat16, "cpu": torch.float32}  # the interpreter has no bf16 dot
# Tiles are at most one group wide (BK <= 128 at g128): BN, BK, splits, warps
GEMV_TILES = [(bn, 128, sp, w) for bn, w in ((64, 4), (128, 8), (256, 8)) for sp in (1, 2, 4, 8)]
GEMM_TILES = [(bn, bk, sp, 4) for bn, bk in ((64, 128), (128, 128), (128, 64)) for sp in (1, 2, 4)]
# Tiled-layout kernels (runtime/triton_int4.py's GEMV_T / GEMM_T): (BN, warps, options). Options: bit 0 scale
# per weight (GEMM_T), bits 1-3 pipeline stages (0: Triton's default), bits 4-5 log2 tiles per loop iteration.
# Split counts are tried from 1 up while the grid stays under 8 (GEMV_T) or 2 (GEMM_T) waves of the GPU's
# SMs, and at most 16.
# Calls A and B (session 6) swept U = 1, 2, 4, per-weight scales, 2-4 stages, BN 32-128 and 4-8 warps: per-tile
# scales and Triton's default stages won everywhere, U = 2 helped the GEMV a little; these are what is left,
# plus the inline-PTX nibble conversion (options bit 6; with bit 0 the PTX also applies the scale).
GEMV_T_TILES = [(32, 4, 0), (64, 4, 0), (64, 4, 16)]
GEMM_T_TILES = [(64, 4, 0), (64, 4, 64), (64, 4, 65), (128, 8, 64), (128, 8, 65)]
# The word-layout GEMM_W (session 7): (BN, warps, options); options bit 0 scale per weight, bits 1-3 stages,
# bit 5 scales and zero points from one int32 [G, N] (pipelined). Call A (session 7) also swept per-weight
# scales, 4 stages and scales loaded one iteration ahead in registers (bit 4, since removed): none won.
GEMM_W_TILES = [(64, 4, 0), (128, 8, 0), (128, 4, 0), (64, 4, 32), (128, 8, 32), (128, 4, 32)]
# The word-layout GEMV_W (1 row; more rows re-read the weights): (BN, warps, options); option bit 4 loads
# the next tile one iteration ahead. Call A (without bit 4): BN 128 / 4 warps won gate_up, (256, 8), (512,
# 8) never won.
GEMV_W_TILES = [(128, 4, 0), (64, 4, 0), (128, 4, 16), (256, 4, 16), (64, 4, 16)]
# DEQUANT (session 8, prefill-sized row counts, from 64 rows): the word layout dequantized to a dense bf16
# weight once per call (BN rows a program, warps), then cuBLAS; the cell's time includes both.
DEQUANT_TILES = [(32, 4), (64, 8)]
# MMA (session 19, runtime/cuda_int4.py): the CUDA tensor-core kernel for 1-8 rows; its knobs are the warps
# per block (K slices summed in shared memory), the 16-row tiles per warp (sharing its activation loads), the
# blocks per SM asked of the compiler (a register cap: more warps in flight, perhaps spills) and the variant
# bits (SUBA: the zero point subtracted from A, no second mma; SUBX, session 22: the offset removed once a group,
# one row only). Session 19 (call D): 1-2 warps a block and 2 tiles a warp never won; session 20's Nsight Compute profile (bench/TORCH.md): 126 registers held qkv / o to 2
# blocks of 8 warps an SM and qkv to 1.45 waves, warps stalled on their loads' latency.
MMA_LAYOUTS = [
    (ksb, 1, minb, bits)
    for ksb in (4, 8, 16)
    for minb in (0, 2, 3, 4, 6, 8)
    for bits in (0, SUBA, SUBX)
    if 32 * ksb * minb <= 2048
]
CELLS = ("gemv", "gemm", "gemv_t", "gemm_t", "gemm_w", "gemv_w", "dequant", "mma")
L2_BYTES = 256 << 20  # weight copies cycled per call span this, so no call finds its weight in L2 (50 MB)
ROW_ORDER = (32, 1, 8, 16, 4, 64, 2, 256)  # the two targets first: a budget cut drops the rest


VOCABS = {"llama3-8b": 128256, "demo": 2048, "tiny": 96}


def shapes(model: str, head: bool = False) -> list[tuple[int, int]]:
    """A decoder layer's linear shapes; head: the lm_head [vocab, hidden] too (a build with quantize_lm_head)."""
    h, i, hq, hkv, d = MODELS[model]
    out = [((hq + 2 * hkv) * d, h), (h, hq * d), (2 * i, h), (h, i)]
    return out + [(VOCABS[model], h)] if head else out


def graph_us(fn, copies: int, reps: int = 20, replays: int = 7) -> float:
    """GPU microseconds per call of fn(i) (i: which weight copy), replayed from one CUDA graph of `reps`
    calls that cycle through the copies (median of replays). On the CPU (a dry run through Triton's
    interpreter) the wall time of one call."""
    if not torch.cuda.is_available():
        t = time.perf_counter()
        fn(0)
        return (time.perf_counter() - t) * 1e6
    g, _ = capture(lambda: [fn(i % copies) for i in range(reps)])
    return replay_us(g, replays) / reps


def capture(body):
    """body() run once on a side stream (compiles, allocations), then captured into a CUDA graph and replayed
    once: (the graph, what the captured body returned; its tensors are rewritten at each replay)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        body()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = body()
    g.replay()
    return g, out


def replay_us(g, replays: int) -> float:
    """The median GPU microseconds of one replay of graph g."""
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3)
    return sorted(times)[len(times) // 2]


def n_copies(nbytes: int, dev) -> int:
    return 1 if dev.type != "cuda" else max(2, min(20, -(-L2_BYTES // nbytes)))


def best_triton(x, packs, k, ref, entries, keep_all: bool = False) -> dict:
    """The fastest correct entry {'us', 'entry', 'rel_err', ...}; packs: copies of (codes, scales, zeros)
    in the layout the entries' kind reads. keep_all: also every timed entry's us ('all')."""
    best, failed, timed = None, [], []
    for e in entries:
        try:
            y = launch(x, *packs[0][:3], k, 128, e, *packs[0][3:])
            err = ((y.float() - ref).norm() / ref.norm()).item()
            if not err < 2e-2:
                failed.append({"entry": e, "rel_err": err})
                continue
            us = graph_us(lambda i, e=e: launch(x, *packs[i][:3], k, 128, e, *packs[i][3:]), len(packs))
        except Exception as ex:  # noqa: BLE001 - a config that does not compile is a result, not a crash
            failed.append({"entry": e, "error": f"{type(ex).__name__}: {str(ex)[:200]}"})
            continue
        timed.append([e, round(us, 2)])
        if best is None or us < best["us"]:
            best = {"us": us, "entry": e, "rel_err": err}
    best = best or {"us": None, "entry": None}
    best.update(tried=len(entries), failed=failed[:5], n_failed=len(failed))
    if keep_all:
        best["all"] = timed
    return best


def _splits(n: int, m: int, bn: int, bm: int, sms: int, waves: int) -> list[int]:
    out, sp = [], 1
    while sp <= 16:
        out.append(sp)
        if -(-n // bn) * -(-m // bm) * sp >= waves * sms:
            break
        sp *= 2
    return out


class Shape:
    """One linear [n, k]: RTN int4 g128 asymmetric codes of a random weight, in every layout, with
    enough copies of each that consecutive calls miss L2."""

    def __init__(self, n: int, k: int, dev, model: str):
        self.n, self.k, self.dev, self.model = n, k, dev, model
        torch.manual_seed(0)
        wf = torch.randn(n, k, device=dev) * 0.02
        qt = quantize_rtn(wf, 4, 128, False, scale_dtype=torch.float16)
        self.wd = dequantize(qt).to(dev)
        act = ACT_DTYPE[dev.type]
        copies = n_copies(n * k // 2, dev)
        self.wbs = [wf.to(act) for _ in range(n_copies(n * k * 2, dev))]
        sz = (qt.scales.to(dev), qt.zeros.to(dev))
        self.packs = {}
        layouts = (
            ("qform", pack_nibbles(qt.codes)),
            ("tiled", pack_tiles(qt.codes, 128)),
            ("words", pack_words(qt.codes)),
            ("frags", pack_frags(qt.codes, 128)),
        )
        for name, w in layouts:
            p = (w.to(dev), *sz)
            if name == "words":  # GEMM_W's option bit 5 reads the scale and zero point from one int32
                p = (*p, pack_scale_zero(qt.scales, qt.zeros).to(dev))
            self.packs[name] = [p] + [tuple(t.clone() for t in p) for _ in range(copies - 1)]
        self.tinys = []
        if tinygemm_fits(qt, dev.type == "cuda", torch.bfloat16):
            self.tinys = [Int4Linear(qt, dtype=act, device=dev) for _ in range(copies)]
        self.cells: dict[str, dict] = {}

    def measure(
        self, m: int, quick: bool, old: dict | None, sms: int, sweep: tuple[str, ...] = CELLS
    ) -> dict:
        """One row bucket: bf16, tinygemm (up to 64 rows) and our kernels. A cell in `sweep` is timed over
        its grid of tiles; any other cell only at the shipped table's entry for it (`old`), if it has one."""
        n, k, dev = self.n, self.k, self.dev
        x = torch.randn(m, k, device=dev, dtype=ACT_DTYPE[dev.type])
        ref = x.float() @ self.wd.T
        cell = {"bf16_us": graph_us(lambda i: F.linear(x, self.wbs[i]), len(self.wbs))}
        tg = self.tinys and m <= 64
        cell["tinygemm_us"] = graph_us(lambda i: self.tinys[i](x), len(self.tinys)) if tg else None
        bm = min(64, max(16, 1 << (m - 1).bit_length()))
        grids = {
            "gemv": [[m, GEMV, bn, bk, sp, bm, w] for bn, bk, sp, w in GEMV_TILES] if m <= 4 else [],
            "gemm": [[m, GEMM, bn, bk, sp, bm, w] for bn, bk, sp, w in GEMM_TILES] if m > 4 else [],
            "gemv_t": [
                [m, GEMV_T, bn, o, sp, 16, w]
                for bn, w, o in GEMV_T_TILES
                for sp in _splits(n, 1, bn, 1, sms, 8)
            ]
            if m <= 4
            else [],
            # GEMM_T / GEMM_W at every row count: their tensor cores pad the rows to 16
            "gemm_t": [
                [m, GEMM_T, bn, o, sp, bm, w]
                for bn, w, o in GEMM_T_TILES
                for sp in _splits(n, m, bn, bm, sms, 2)
            ],
            "gemm_w": [
                [m, GEMM_W, bn, o, sp, bm, w]
                for bn, w, o in GEMM_W_TILES
                for sp in _splits(n, m, bn, bm, sms, 2)
            ],
            "gemv_w": [
                [m, GEMV_W, bn, o, sp, 16, w]
                for bn, w, o in GEMV_W_TILES
                for sp in _splits(n, 1, bn, 1, sms, 8)
            ]
            if m == 1
            else [],
            "dequant": [[m, DEQUANT, bn, 0, 1, 0, w] for bn, w in DEQUANT_TILES] if m >= 64 else [],
            "mma": [
                [m, MMA, ksb, rpw, 1, minb, bits]
                for ksb, rpw, minb, bits in MMA_LAYOUTS
                if m == 1 or not bits & SUBX  # SUBX: one row only
            ]
            if m <= MAX_ROWS and dev.type == "cuda"
            else [],
        }
        layout = dict(gemv="qform", gemm="qform", gemv_t="tiled", gemm_t="tiled")
        layout.update(gemm_w="words", gemv_w="words", dequant="words", mma="frags")
        for name in CELLS:
            if name in sweep:
                entries = grids[name][:2] if quick else grids[name]
            elif old and (old.get(name) or {}).get("entry"):
                entries = [[m, *old[name]["entry"][1:]]]
            else:
                continue
            if entries:
                cell[name] = best_triton(x, self.packs[layout[name]], k, ref, entries, keep_all=name in sweep)
        self.cells[str(m)] = cell
        brief = {a: (b["us"], b["entry"]) if isinstance(b, dict) else b for a, b in cell.items()}
        print(f"  [{n}x{k}] rows {m}: {json.dumps(brief)}", flush=True)
        return cell

    def row(self) -> dict:
        rows = {r: self.cells[r] for r in sorted(self.cells, key=int)}
        copies = len(self.packs["qform"])
        return {"model": self.model, "n": self.n, "k": self.k, "weight_copies_cycled": copies, "rows": rows}


def ptx_notes() -> dict:
    """Per compiled GEMM_T / GEMV_T variant: does its PTX use wgmma, and how many int-to-float conversions
    and shared-memory loads it has (what bounded the session-4 kernels)."""
    from lorafast_export.runtime import triton_int4 as t4

    notes = {}
    for name in ("_gemm_t_kernel", "_gemv_t_kernel", "_gemm_kernel"):
        try:
            for cache in getattr(t4, name).device_caches.values():
                for key, kern in cache[0].items():
                    ptx = kern.asm.get("ptx", "")
                    c = kern.metadata
                    tag = f"{name} warps={c.num_warps} stages={c.num_stages} {str(key)[-80:]}"
                    notes[tag] = {
                        "wgmma": ptx.count("wgmma.mma_async"),
                        "mma_sync": ptx.count("mma.sync"),
                        "cvt_rn_f32_s32": ptx.count("cvt.rn.f32.s32") + ptx.count("cvt.rn.f32.u32"),
                        "ld_shared": ptx.count("ld.shared"),
                        "ld_global_v4": ptx.count("ld.global.v4"),
                    }
        except Exception as ex:  # noqa: BLE001 - notes only
            notes[name] = f"{type(ex).__name__}: {ex}"[:200]
    return notes


def merge(shipped: dict, new: dict, path: Path) -> None:
    """Write `shipped` with the row buckets `new` measured replacing its own, shape by shape (a bucket the
    new run did not reach keeps the shipped cell, so the plan keeps its other buckets)."""
    out = json.loads(json.dumps(shipped))
    for row in new["shapes"]:
        old = next(
            (r for r in out.setdefault("shapes", []) if (r["n"], r["k"]) == (row["n"], row["k"])), None
        )
        if old is None:
            out["shapes"].append(row)
        else:
            old["rows"].update(row["rows"])
    buckets = sorted({int(b) for row in new["shapes"] for b in row["rows"]})
    out["measured"] = f"{shipped.get('measured', '')}; rows {buckets} replaced by a {new.get('date')} run"
    tmp = path.with_suffix(".tmp")  # whole or not at all: the runtime may read it after a timeout
    tmp.write_text(json.dumps(out, indent=1))
    tmp.replace(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--shapes", default="llama3-8b,demo", help=f"models whose linear shapes to measure: {list(MODELS)}"
    )
    p.add_argument("--out", default="")
    p.add_argument("--budget-s", type=float, default=1e9, help="stop adding shapes after this many seconds")
    p.add_argument("--quick", action="store_true", help="two tiles per kernel, rows 1 and 8 (a dry run)")
    p.add_argument("--rows", default="", help="row buckets, in this order (default: the targets first)")
    p.add_argument(
        "--reuse-old",
        action="store_true",
        help="time the kernels not in --sweep only at the entry the shipped table chose per cell",
    )
    p.add_argument(
        "--sweep", default=",".join(CELLS), help=f"kernel cells swept over their tile grid: {CELLS}"
    )
    p.add_argument(
        "--merge-into",
        default="",
        help="also write the shipped table with this run's measured cells replacing its own (other buckets kept)",
    )
    p.add_argument("--with-head", action="store_true", help="also the lm_head shape [vocab, hidden]")
    a = p.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    import triton

    gpu = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu-interpreter"
    table = {
        "gpu": gpu,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "weights": "RTN int4 g128 asymmetric, fp16 scales, bf16 activations; times: CUDA graph replay",
        "date": time.strftime("%Y-%m-%d"),
        "shapes": [],
    }
    out = Path(a.out or table_file(gpu).name)
    old = load_table(gpu) if a.reuse_old else None
    sms = torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 132
    t0 = time.perf_counter()
    measured = [
        Shape(n, k, dev, model) for model in a.shapes.split(",") for n, k in shapes(model, a.with_head)
    ]
    rows = [int(r) for r in a.rows.split(",")] if a.rows else ((1, 8) if a.quick else ROW_ORDER)
    for m in rows:
        for sh in measured:
            if time.perf_counter() - t0 > a.budget_s:
                print(f"budget: skipped {sh.n}x{sh.k} rows {m}", flush=True)
                continue
            prev = next((r for r in (old or {}).get("shapes", []) if (r["n"], r["k"]) == (sh.n, sh.k)), None)
            sh.measure(m, a.quick, (prev or {}).get("rows", {}).get(str(m)), sms, tuple(a.sweep.split(",")))
            table["shapes"] = [x.row() for x in measured if x.cells]
            out.write_text(json.dumps(table, indent=1))
            if a.merge_into:
                merge(load_table(gpu) or {}, table, Path(a.merge_into))
    table["ptx"] = ptx_notes() if dev.type == "cuda" else {}
    out.write_text(json.dumps(table, indent=1))
    print(f"wrote {out} in {time.perf_counter() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
