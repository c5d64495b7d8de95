"""Measuring the int4 kernel table the runtime reads at load (runtime/int4_table.py) on the GPU it serves:
`lorafast-export tune-kernels` for a user's GPU and model, bench/int4_kernels.py and bench/mma_fused_bench.py for
the tables we ship (lorafast_export/data/kernels/).

For each fused linear shape of a model ([N, K]: qkv, o, gate_up, down) and each row bucket, it times the
dense bf16 matmul, torch's tinygemm (where it applies, up to 64 rows), our Triton GEMV / GEMM on qform's
packing (a grid of tiles, or with the shipped table's entry per cell) and the tiled-layout
GEMV_T / GEMM_T over a grid of tiles, options and split counts (every timing kept under 'all'), on RTN
int4 g128 asymmetric codes of a random weight. Every call is replayed from a CUDA graph, as the runtime's decode
step runs it, so launch overhead is not counted, and consecutive calls read different copies of the weight
(256 MB in all), as consecutive layers do, so none is served from L2. Every Triton config is also checked against
the dequantized matmul; a config that fails is recorded and never chosen. The fused decode ops (cuda_int4.py's
qkv + rope, o + residual, norm + gate/up at one row) are timed over their block layouts beside the plain product
(measure_fused). On a CPU (Triton's interpreter) the same code runs as a dry run, its times meaning nothing.
"""

from __future__ import annotations

import json
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F

from lorafast_export.qform import dequantize, pack_nibbles
from lorafast_export.quant.rtn import quantize_rtn
from lorafast_export.runtime import cuda_int4
from lorafast_export.runtime.cuda_int4 import MAX_ROWS, SUBA, SUBX, pack_frags
from lorafast_export.runtime.int4_table import layer_shapes
from lorafast_export.runtime.linear import Int4Linear, tinygemm_fits
from lorafast_export.runtime.triton_int4 import (
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
    out = layer_shapes(MODELS[model])
    return out + [(VOCABS[model], MODELS[model][0])] if head else out


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
            ("qform", pack_nibbles),
            ("tiled", lambda c: pack_tiles(c, 128)),
            ("words", pack_words),
            ("frags", lambda c: pack_frags(c, 128)),
        )
        for name, pack in layouts:
            try:
                w = pack(qt.codes)
            except (
                ValueError
            ) as e:  # a shape the layout's kernels cannot take (e.g. frags: K % 64): not timed
                print(f"  [{n}x{k}] no {name} layout: {e}", flush=True)
                continue
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
            if entries and layout[name] in self.packs:
                cell[name] = best_triton(x, self.packs[layout[name]], k, ref, entries, keep_all=name in sweep)
        self.cells[str(m)] = cell
        brief = {a: (b["us"], b["entry"]) if isinstance(b, dict) else b for a, b in cell.items()}
        print(f"  [{n}x{k}] rows {m}: {json.dumps(brief)}", flush=True)
        return cell

    def row(self) -> dict:
        rows = {r: self.cells[r] for r in sorted(self.cells, key=int)}
        copies = len(next(iter(self.packs.values()), []))
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
    prev = shipped.get("measured")
    run = f"rows {buckets} {'replaced by' if prev else 'measured in'} a {new.get('date')} run"
    out["measured"] = f"{prev}; {run}" if prev else run
    tmp = path.with_suffix(".tmp")  # whole or not at all: the runtime may read it after a timeout
    tmp.write_text(json.dumps(out, indent=1))
    tmp.replace(path)


FUSED_LAYOUTS = [
    (ksb, minb, bits)
    for ksb in (4, 8, 16)
    for minb in (0, 2, 3, 4)
    for bits in (0, cuda_int4.SUBA, cuda_int4.SUBX)
]


def fused_weight(n: int, k: int, dev) -> types.SimpleNamespace:
    codes = torch.randint(0, 16, (n, k), device=dev, dtype=torch.uint8)
    return types.SimpleNamespace(
        weight_frags=cuda_int4.pack_frags(codes, 128),
        scales=(torch.rand(n, k // 128, device=dev) * 0.01).half(),
        zeros=torch.randint(0, 16, (n, k // 128), device=dev, dtype=torch.uint8),
        in_features=k,
        out_features=n,
        group_size=128,
    )


def measure_fused(op: str, ws: list, m: int, entry, dims: tuple) -> dict:
    """One op at m rows: the plain product at the table's entry and the fused op at every layout that fits."""
    dev, dt = ws[0].scales.device, torch.bfloat16
    hq, hkv, hd = dims
    n, k = ws[0].out_features, ws[0].in_features
    x = torch.randn(m, k, device=dev, dtype=dt)
    d, nw = torch.randn_like(x), torch.rand(k, device=dev, dtype=dt) + 0.5
    res = torch.randn(m, n, device=dev, dtype=dt)
    kp = torch.zeros(hkv, 4096, hd, device=dev, dtype=dt)
    vp, slots = torch.zeros_like(kp), torch.arange(m, device=dev) * 7
    cos, sin = torch.rand(m, hd, device=dev, dtype=dt), torch.rand(m, hd, device=dev, dtype=dt)
    plain = None
    if entry:
        ksb, rpw, minb, bits = cuda_int4.layout(entry)

        def product(i):
            w = ws[i]
            return cuda_int4.mma_mm(x, w.weight_frags, w.scales, w.zeros, k, 128, ksb, rpw, minb, bits)

        plain = round(graph_us(product, len(ws)), 2)

    def call(i, lay):
        w = ws[i]
        args = (w.weight_frags, w.scales, w.zeros, k, 128, lay)
        if op == cuda_int4.QKV_OP:
            rope = (cos, sin, kp, vp, slots, hq * hd)
            return cuda_int4.fused_launch(op, x, *args, delta=d, nw=nw, eps=1e-5, rope=rope)
        if op == cuda_int4.O_OP:
            return cuda_int4.fused_launch(op, x, *args, res=res)
        return cuda_int4.fused_launch(op, x, *args, nw=nw, eps=1e-5)

    timed = []
    for lay in FUSED_LAYOUTS:
        if m > 1 and lay[2] & cuda_int4.SUBX:  # SUBX: one row only
            continue
        why = cuda_int4.fused_unready(op, ws[0], lay, dt, False, hd if op == cuda_int4.QKV_OP else 0)
        if why is None:
            timed.append([list(lay), round(graph_us(lambda i, lay=lay: call(i, lay), len(ws)), 2)])
    timed.sort(key=lambda t: t[1])
    return {"op": op, "n": n, "k": k, "rows": m, "plain_entry": entry, "plain_us": plain, "fused": timed}


def merge_fused(path: Path, out: dict) -> None:
    """The table at path with each measured op's fastest 1-row layout in its "fused_mma" section (whole or not at
    all: the runtime may read it)."""
    table = json.loads(path.read_text())
    for r in out["results"]:
        if r["rows"] == 1 and r["fused"]:
            cell = {"layout": r["fused"][0][0], "us": r["fused"][0][1], "plain_us": r["plain_us"], "rows": 1}
            table.setdefault("fused_mma", {}).setdefault(r["op"], {})[f"{r['n']}x{r['k']}"] = cell
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(table, indent=1))
    tmp.replace(path)


def new_table(gpu: str) -> dict:
    import triton

    return {
        "gpu": gpu,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "weights": "RTN int4 g128 asymmetric, fp16 scales, bf16 activations; times: CUDA graph replay",
        "date": time.strftime("%Y-%m-%d"),
        "shapes": [],
    }


def tune(
    name: str,
    dims: tuple[int, int, int, int, int],
    vocab: int | None,
    rows: list[int],
    budget_s: float,
    quick: bool = False,
    log=print,
) -> dict:
    """`lorafast-export tune-kernels`: the int4 table for one model's linear shapes (its lm_head too with vocab)
    measured on this GPU (on a CPU: a dry run through Triton's interpreter), row bucket by row bucket in the
    order of `rows` until budget_s has passed, and on CUDA the fused decode ops at one row; merged over this
    GPU's table (the user's, else the shipped one: other shapes and buckets kept) into user_table_file, whole or
    not at all. Returns what was written and measured."""
    from lorafast_export.runtime.int4_table import load_table, user_table_file

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu-interpreter"
    h = dims[0]
    wanted = layer_shapes(dims) + ([(vocab, h)] if vocab else [])
    wanted = [
        nk for j, nk in enumerate(wanted) if nk not in wanted[:j]
    ]  # e.g. o_proj and down at equal widths
    before = load_table(gpu) or {}
    table = new_table(gpu)
    sms = torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 132
    t0, skipped = time.perf_counter(), []
    measured = [Shape(n, k, dev, name) for n, k in wanted]
    for m in rows:
        for sh in measured:
            if time.perf_counter() - t0 > budget_s:
                skipped.append(f"{sh.n}x{sh.k} rows {m}")
                continue
            sh.measure(m, quick, None, sms)
    table["shapes"] = [x.row() for x in measured if x.cells]
    path = user_table_file(gpu)
    path.parent.mkdir(parents=True, exist_ok=True)
    if table["shapes"]:
        # over this GPU's table, else a new one with this run's header (its GPU, versions and date)
        merge(before or {k: v for k, v in table.items() if k != "shapes"}, table, path)
    fused = []
    if dev.type == "cuda" and table["shapes"]:
        fused = _tune_fused(path, dims, log)
    load_table.cache_clear()
    return {
        "gpu": gpu,
        "table": str(path),
        "shapes": [f"{n}x{k}" for n, k in wanted],
        "rows": rows,
        "measured_cells": sum(len(x.cells) for x in measured),
        "skipped_by_budget": skipped,
        "fused_ops": fused,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def fused_ops(dims: tuple[int, int, int, int, int]) -> dict[str, tuple[int, int]]:
    """The fused decode ops (runtime/cuda_int4.py) and their weights' [N, K] for a model's dims."""
    h, inter, hq, hkv, hd = dims
    return {
        cuda_int4.QKV_OP: ((hq + 2 * hkv) * hd, h),
        cuda_int4.O_OP: (h, hq * hd),
        cuda_int4.GLU_OP: (2 * inter, h),
    }


def mma_entry(table: dict, n: int, k: int, m: int) -> list | None:
    """The table's MMA entry for an [n, k] linear at m rows (the plain product a fused op is timed beside)."""
    from lorafast_export.runtime.int4_table import shape_row

    return (((shape_row(table, n, k) or {}).get("rows", {}).get(str(m)) or {}).get("mma") or {}).get("entry")


def _tune_fused(path: Path, dims: tuple[int, int, int, int, int], log, dev=None) -> list[str]:
    """The fused decode ops of these shapes at one row (their layouts beside the plain product at the table's
    MMA entry), merged into the table at path; the ops that fused. A shape the fused kernels cannot take is
    left unfused (the runtime then runs its plain kernels), with a log line."""
    table = json.loads(path.read_text())
    dev, out = dev or torch.device("cuda"), {"results": []}
    for op, (n, k) in fused_ops(dims).items():
        try:
            ws = [fused_weight(n, k, dev) for _ in range(n_copies(n * k // 2, dev))]
            out["results"].append(measure_fused(op, ws, 1, mma_entry(table, n, k, 1), dims[2:]))
        except Exception as e:  # noqa: BLE001 - an op that cannot run here stays unfused, which is the default
            log(f"  fused {op} [{n}x{k}]: not measured ({type(e).__name__}: {str(e)[:160]})")
    merge_fused(path, out)
    return [r["op"] for r in out["results"] if r["fused"]]


# ------------------------------------------------------------------------------------------------ int8
# The int8 weight-only table (int8_<gpu>.json, runtime/int4_table.int8_plan_from_table): rows → plan entries
# tried (max rows, kind, BN, BK, splits, BM, warps; runtime/triton_int8.py: kind 0 GEMV, 1 GEMM, 4 GEMM_T,
# 7 DEQUANT). 1 and 32 rows are decode steps; 128 and 1,024 prefills, which the last bucket's entry covers
# beyond (a table measured to 32 rows only would run prefills on a 32-row tile no one timed there; session 34),
# where DEQUANT (the codes dequantized per call, then cuBLAS's bf16 product) mostly wins (session 35).
INT8_ENTRIES = {
    1: [
        [1, 0, bn, bk, sp, 16, w]
        for bn, w in ((32, 4), (64, 4), (128, 8))
        for bk in (128, 256)
        for sp in (1, 4)
    ],
    32: [[32, 1, bn, bk, sp, 32, 4] for bn, bk in ((64, 128), (128, 64)) for sp in (1, 2)]
    + [
        [32, 4, bn, bk, sp, 32, w]
        for bn, w in ((64, 4), (128, 4), (128, 8))
        for bk in (64, 128)
        for sp in (1, 2)
    ],
    **{
        m: [
            [m, kind, bn, bk, 1, bm, w]
            for kind in (1, 4)
            for bm, bn, w in ((32, 128, 4), (64, 64, 4), (64, 128, 4), (128, 128, 8), (128, 64, 4))
            for bk in (64, 128)
        ]
        + [[m, 7, bn, bk, 1, 16, w] for bn, bk, w in ((16, 256, 4), (32, 256, 4), (64, 256, 8), (32, 512, 8))]
        for m in (128, 1024)
    },
}
# --quick: the entries that won on the H100 and H200 (data/kernels/int8_*.json), a few a bucket
INT8_QUICK = {
    1: [[1, 0, 32, 256, 4, 16, 4], [1, 0, 32, 256, 1, 16, 4], [1, 0, 64, 256, 4, 16, 4]],
    32: [[32, 4, 64, 128, 2, 32, 4], [32, 1, 64, 128, 2, 32, 4]],
    128: [[128, 4, 64, 128, 1, 64, 4], [128, 4, 64, 128, 1, 128, 4], [128, 4, 128, 128, 1, 128, 8]],
    1024: [[1024, 7, 16, 256, 1, 16, 4], [1024, 7, 32, 256, 1, 16, 4]],
}
INT8_KINDS = {0: "gemv", 1: "gemm", 4: "gemm_t", 7: "dequant"}


def int8_weight(n: int, k: int, dev) -> tuple[torch.Tensor, list[tuple]]:
    """A random [n, k] weight as RTN int8 per channel (asymmetric, fp16 scales; the kernels read zero points or
    not at the same cost): its dequantized float32 weight and copies of (codes, scales, zeros) on dev."""
    torch.manual_seed(0)
    qt = quantize_rtn(torch.randn(n, k, device=dev) * 0.02, 8, -1, False, scale_dtype=torch.float16)
    pack = (qt.codes.to(dev), qt.scales.to(dev), qt.zeros.to(dev))
    return dequantize(qt).to(dev), [pack] + [
        tuple(t.clone() for t in pack) for _ in range(n_copies(n * k, dev) - 1)
    ]


def measure_int8(wd: torch.Tensor, packs: list[tuple], m: int, entries: list[list[int]]) -> dict:
    """One int8 cell: the dense matmul (bf16 on CUDA) and every entry at m rows, each checked against the
    dequantized product first: {'bf16_us', 'us', 'entry', 'rel_err', 'best_by_kind', 'failed'} ('us' None if
    none passed)."""
    from lorafast_export.runtime.triton_int8 import launch8

    dev, (n, k) = wd.device, wd.shape
    act = ACT_DTYPE[dev.type]
    wbs = [wd.to(act) for _ in range(n_copies(n * k * 2, dev))]
    x = torch.randn(m, k, device=dev, dtype=act)
    ref = x.float() @ wd.T
    cell = {"bf16_us": graph_us(lambda j: F.linear(x, wbs[j]), len(wbs)), "us": None, "entry": None}
    by_kind, failed = {}, []
    for e in entries:
        try:
            y = launch8(x, *packs[0], -1, e)
            err = ((y.float() - ref).norm() / ref.norm()).item()
            if not err < 2e-2:
                failed.append({"entry": e, "rel_err": err})
                continue
            us = graph_us(lambda j, e=e: launch8(x, *packs[j], -1, e), len(packs))
        except Exception as ex:  # noqa: BLE001 - a tile that does not compile is a result, not a crash
            failed.append({"entry": e, "error": f"{type(ex).__name__}: {str(ex)[:200]}"})
            continue
        kind = INT8_KINDS[e[1]]
        if kind not in by_kind or us < by_kind[kind]["us"]:
            by_kind[kind] = {"us": us, "entry": e}
        if cell["us"] is None or us < cell["us"]:
            cell.update(us=us, entry=e, rel_err=err)
    return cell | {"best_by_kind": by_kind, "failed": failed[:5], "n_failed": len(failed)}


def tune_int8(wanted: list[tuple[int, int]], budget_s: float, quick: bool = False, log=print) -> dict:
    """`lorafast-export tune-kernels` for int8 weight-only layers (an int8 artifact's linears, an artifact's int8
    lm_head): each [n, k] at INT8_ENTRIES' row buckets (INT8_QUICK with quick) on this GPU (on a CPU: a dry run
    through Triton's interpreter) until budget_s has passed, merged over this GPU's int8 table (the user's, else
    the shipped one) into user_table_file(gpu, 8), whole or not at all. The runtime keeps a layer in int8 where
    our kernels beat bf16 at every decode bucket (int4_table.int8_plan_from_table)."""
    from lorafast_export.runtime.int4_table import int8_plan_from_table, load_table, user_table_file

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu-interpreter"
    grid = INT8_QUICK if quick else INT8_ENTRIES
    before = load_table(gpu, 8) or {}
    table = new_table(gpu) | {
        "weights": "RTN int8 per channel asymmetric, fp16 scales, bf16 activations; times: CUDA graph replay"
    }
    t0, skipped = time.perf_counter(), []
    for n, k in dict.fromkeys(wanted):
        wd, packs = int8_weight(n, k, dev)
        cells = {}
        for m, entries in grid.items():
            if time.perf_counter() - t0 > budget_s:
                skipped.append(f"{n}x{k} rows {m}")
                continue
            cell = measure_int8(wd, packs, m, entries)
            log(
                f"  int8 {n}x{k} rows {m}: bf16 {cell['bf16_us']:.1f} us, int8 {cell['us'] or float('nan'):.1f} us"
            )
            if cell["us"] is not None:
                cells[str(m)] = {k2: cell[k2] for k2 in ("bf16_us", "us", "entry")}
        del wd, packs
        if cells:
            table["shapes"].append({"n": n, "k": k, "rows": cells})
    path = user_table_file(gpu, 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    if table["shapes"]:
        merge(before or {k: v for k, v in table.items() if k != "shapes"}, table, path)
    load_table.cache_clear()
    written = load_table(gpu, 8)
    return {
        "table": str(path),
        "shapes": [f"{n}x{k}" for n, k in dict.fromkeys(wanted)],
        "in_int8": [f"{n}x{k}" for n, k in dict.fromkeys(wanted) if int8_plan_from_table(written, n, k)],
        "measured_cells": sum(len(r["rows"]) for r in table["shapes"]),
        "skipped_by_budget": skipped,
        "seconds": round(time.perf_counter() - t0, 1),
    }
