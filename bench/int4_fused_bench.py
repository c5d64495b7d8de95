"""Sweep the int4 fused decode kernels' tiles (runtime/triton_fused_int4.py) on the GPU they will serve.

    PYTHONPATH=. python bench/int4_fused_bench.py --json-out int4_fused.json \
        --merge-into lorafast_export/data/kernels/fused_int4_h200.json
    PYTHONPATH=. python bench/int4_fused_bench.py --device cpu --shape tiny --max-tiles 2   # a dry run

For each fused op on the model's linears (Llama-3-8B: qkv + rope 6144 x 4096, o + residual 4096 x 4096, norm +
gate_up + silu-mul 28672 x 4096, down 4096 x 14336) at 1 row, on random RTN-like int4 g128 asymmetric codes
(fp16 scales, uint8 zero points): every tile of FUSED_INT4_TILES, first checked against the op computed in
float32 from the dequantized weight (a tile whose relative error is 2e-2 or more is never chosen), then timed by
CUDA-graph replay of calls cycling through >= 8 copies of the weight (bench/int4_kernels.py's graph_us), so no
call finds its weight in L2. In the same run, the same shapes through today's kernels: torch's tinygemm, our
GEMV_W and GEMM_W (the shipped int4 table's 1-row tiles), int4_mm with the shipped plan (what the unfused
runtime runs for the product alone), and the dense bf16 fused op (runtime/triton_fused.py, its shipped tile).
Prints a markdown table per op (us per call, TB/s of int4 codes + scales + zero points read; the bf16 op: of
its weight); --json-out writes every row, --merge-into writes the winning tile per (op, n, k) into the table
file runtime/triton_fused_int4.py loads (other entries kept). --budget-s bounds the whole run (the tile sweep
of each op gets an equal share of what is left after the setup).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODELS = {  # hidden, intermediate, heads, kv heads, head dim
    "llama3-8b": (4096, 14336, 32, 8, 128),
    "tiny": (128, 128, 2, 1, 32),  # the CPU dry run (Triton's interpreter)
}
GS = 128
MIN_COPIES = 8
ERR_MAX = 2e-2


def op_shapes(model: str) -> list[tuple[str, int, int]]:
    """(op, weight rows, K) of a layer's four fused ops (norm_glu: the [gate; up] weight)."""
    h, i, hq, hkv, d = MODELS[model]
    return [("add_norm_qkv_rope", (hq + 2 * hkv) * d, h), ("gemv_add", h, hq * d), ("norm_glu", 2 * i, h),
            ("gemv", h, i)]  # fmt: skip


def int4_bytes(n: int, k: int, asym: bool = True) -> int:
    """Bytes of codes, scales (fp16) and zero points one call reads."""
    return n * k // 2 + n * -(-k // GS) * (3 if asym else 2)


class Case:
    """One op's weight (copies of its int4 packings and of a dense copy), inputs and float32 reference."""

    def __init__(self, op: str, n: int, k: int, model: str, dev, act, copies: int):
        from lorafast_export.qform import QTensor
        from lorafast_export.runtime.triton_int4 import pack_scale_zero, pack_words

        g = torch.Generator(device=dev).manual_seed(n + k)
        groups = -(-k // GS)
        codes = torch.randint(0, 16, (n, k), device=dev, dtype=torch.uint8, generator=g)
        s = (torch.rand(n, groups, device=dev, generator=g) * 0.004 + 0.002).half()
        z = torch.randint(0, 16, (n, groups), device=dev, dtype=torch.uint8, generator=g)
        self.op, self.n, self.k, self.dev, self.act = op, n, k, dev, act
        self.qt = QTensor(codes=codes, scales=s, zeros=z, bits=4, group_size=GS)
        cols = lambda t: t.float().repeat_interleave(GS, 1)[:, :k]  # noqa: E731
        self.w = (codes.float() - cols(z)) * cols(s)  # the dequantized weight, float32
        q4 = (pack_words(codes), s, z, pack_scale_zero(s, z), GS)
        self.q4 = [q4] + [
            tuple(t.clone() if isinstance(t, torch.Tensor) else t for t in q4) for _ in range(copies - 1)
        ]
        self.copies = copies
        self.x, self.d = (torch.randn(1, k, device=dev, generator=g).to(act) for _ in range(2))
        self.nw = (1 + 0.1 * torch.randn(k, device=dev, generator=g)).to(act)
        cols_out = n // 2 if op == "norm_glu" else n
        self.r = torch.randn(1, cols_out, device=dev, generator=g).to(act)
        self.rope = self._rope_inputs(model) if op == "add_norm_qkv_rope" else None
        self.want = self._reference()

    def _rope_inputs(self, model: str):
        _, _, hq, hkv, hd = MODELS[model]
        emb = torch.tensor([[1234.0]], device=self.dev) * (
            1.0 / 500000 ** (torch.arange(0, hd, 2, device=self.dev).float() / hd)
        )
        emb = torch.cat([emb, emb], -1)
        kp, vp = (torch.zeros(hkv, 512, hd, device=self.dev, dtype=self.act) for _ in range(2))
        slots = torch.tensor([77], device=self.dev)
        return emb.cos().to(self.act), emb.sin().to(self.act), kp, vp, slots, hq * hd

    def _reference(self) -> torch.Tensor:
        """The op in float32 from the dequantized weight (for the rope op: q, k, v as `gathered` returns them)."""
        from lorafast_export.model.decoder import rotate_half

        x = self.x.float() + self.d.float() if self.op == "add_norm_qkv_rope" else self.x.float()
        if self.op in ("add_norm_qkv_rope", "norm_glu"):
            x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * self.nw.float()
        y = x @ self.w.T
        if self.op == "add_norm_qkv_rope":
            cos, sin, kp, _, _, qn = self.rope
            hd, kn = kp.shape[2], kp.shape[0] * kp.shape[2]
            qk = y[:, : qn + kn].reshape(1, -1, hd)
            qk = qk * cos.float()[:, None] + rotate_half(qk) * sin.float()[:, None]
            return torch.cat([qk.flatten(1), y[:, qn + kn :]], 1)
        if self.op == "norm_glu":
            gate, up = y.chunk(2, dim=-1)
            return F.silu(gate) * up
        return y + self.r.float() if self.op == "gemv_add" else y

    def fused_int4(self, i: int, tiles) -> torch.Tensor:
        from lorafast_export.runtime import triton_fused_int4 as f4

        q4 = self.q4[i]
        if self.op == "add_norm_qkv_rope":
            return f4.add_norm_qkv_rope_int4_launch(
                self.x, self.d, self.nw, q4, 1e-5, None, *self.rope, tiles
            )[1]
        if self.op == "gemv_add":
            return f4.gemv_add_int4_launch(self.x, q4, self.r, tiles)
        if self.op == "norm_glu":
            return f4.norm_glu_int4_launch(self.x, self.nw, q4, 1e-5, tiles)
        return f4.gemv_int4_launch(self.x, q4, tiles)

    def gathered(self, q: torch.Tensor) -> torch.Tensor:
        """The rope op's q with the k and v it wrote at the row's slot; other ops' outputs as they are."""
        if self.op != "add_norm_qkv_rope":
            return q
        kp, vp, slots = self.rope[2:5]
        return torch.cat(
            [q, kp[:, slots].transpose(0, 1).flatten(1), vp[:, slots].transpose(0, 1).flatten(1)], 1
        )

    def rel_err(self, y: torch.Tensor) -> float:
        return ((self.gathered(y).float() - self.want).norm() / self.want.norm()).item()


def _timed(case: Case, name: str, fn, nbytes: int, check=None) -> dict:
    """{'kernel', 'us', 'TBps', 'rel_err'} of fn(i) (i: the weight copy) or {'kernel', 'error'}."""
    from bench.int4_kernels import graph_us

    row: dict = {"kernel": name}
    try:
        if check is not None:
            row["rel_err"] = check(fn(0))
        row["us"] = graph_us(fn, case.copies)
        row["TBps"] = nbytes / row["us"] / 1e6
    except Exception as ex:  # noqa: BLE001 - a kernel that fails here is a result
        row["error"] = f"{type(ex).__name__}: {ex}"[:200]
    return row


def current_kernels(case: Case, gpu: str) -> list[dict]:
    """The same shape through today's kernels: tinygemm, GEMV_W and GEMM_W with the shipped table's 1-row
    tiles, int4_mm with the shipped plan (the products the unfused int4 step runs), the dense fused op."""
    from lorafast_export.runtime import triton_fused as tf
    from lorafast_export.runtime import triton_int4 as t4
    from lorafast_export.runtime.int4_table import load_table, plan_from_table
    from lorafast_export.runtime.tinygemm import tinygemm_mm, tinygemm_pack

    n, k, x, nb = case.n, case.k, case.x, int4_bytes(case.n, case.k)
    prod = lambda y: ((y.float() - x.float() @ case.w.T).norm() / (x.float() @ case.w.T).norm()).item()  # noqa: E731
    rows = []
    try:
        tg = [tinygemm_pack(case.qt, case.qt.codes, case.act, case.dev) for _ in range(case.copies)]
        rows.append(_timed(case, "tinygemm", lambda i: tinygemm_mm(x, tg[i][0], GS, tg[i][1]), nb, prod))
    except Exception as ex:  # noqa: BLE001
        rows.append({"kernel": "tinygemm", "error": f"{type(ex).__name__}: {ex}"[:200]})
    table = load_table(gpu) if gpu else None
    cell = next(
        (r["rows"].get("1", {}) for r in (table or {}).get("shapes", []) if (r["n"], r["k"]) == (n, k)), {}
    )
    defaults = {"gemv_w": [1, t4.GEMV_W, 128, 16, 8, 16, 4], "gemm_w": [1, t4.GEMM_W, 64, 32, 1, 16, 4]}
    for kind, default in defaults.items():
        entry = (cell.get(kind) or {}).get("entry") or default
        fn = lambda i, e=entry, q=case.q4: t4.launch(x, q[i][0], q[i][1], q[i][2], k, GS, e, q[i][3])  # noqa: E731
        rows.append({**_timed(case, f"{kind} {entry}", fn, nb, prod)})
    choice = plan_from_table(table, n, k, allow_tinygemm=case.act == torch.bfloat16)
    if choice and choice[0] == "int4_triton":
        lin = _linear(case, choice[1])
        rows.append(
            _timed(case, f"int4_mm shipped plan {t4.pick(choice[1], 1)}", lambda i: lin[i](x), nb, prod)
        )
    dense = [(case.w.to(case.act)) for _ in range(case.copies)]
    dense_op = {"add_norm_qkv_rope": "add_norm_qkv_rope", "gemv_add": "gemv_add", "norm_glu": "norm_glu"}
    tiles = tf.fused_config(dense_op.get(case.op, "gemv"), n, k)

    def bf16_fused(i):
        if case.op == "add_norm_qkv_rope":
            return tf.add_norm_qkv_rope_launch(
                case.x, case.d, case.nw, dense[i], 1e-5, None, *case.rope, tiles
            )[1]
        if case.op == "gemv_add":
            return tf.gemv_add_launch(x, dense[i], case.r, tiles)
        if case.op == "norm_glu":
            return tf.norm_glu_launch(x, case.nw, dense[i], 1e-5, tiles)
        return tf.gemv_launch(x, dense[i], tiles)

    rows.append(_timed(case, f"bf16 fused {tiles}", bf16_fused, n * k * x.element_size(), case.rel_err))
    return rows


def _linear(case: Case, plan: list[int]):
    """Int4TritonLinear copies over the case's codes with this plan (int4_mm, as the unfused runtime calls it)."""
    from lorafast_export.runtime.linear import Int4TritonLinear

    return [Int4TritonLinear(case.qt, dtype=case.act, device=case.dev, plan=plan) for _ in range(case.copies)]


def sweep(case: Case, tiles: list, deadline: float) -> tuple[list[dict], dict | None]:
    """Every tile checked and timed until the deadline: (rows, the fastest correct row or None)."""
    sz_bytes = case.n * -(-case.k // GS) * 4
    rows = []
    for t in tiles:
        if time.perf_counter() > deadline:
            rows.append({"kernel": "fused int4", "tile": list(t), "cut": "budget"})
            break
        nb = case.n * case.k // 2 + (
            sz_bytes if len(t) > 4 and t[4] else int4_bytes(case.n, case.k) - case.n * case.k // 2
        )
        row = _timed(case, "fused int4", lambda i, t=t: case.fused_int4(i, t), nb, case.rel_err)
        rows.append({**row, "tile": list(t)})
    ok = [r for r in rows if "us" in r and r["rel_err"] < ERR_MAX]
    return rows, min(ok, key=lambda r: r["us"]) if ok else None


def markdown(op: str, n: int, k: int, best: dict | None, current: list[dict]) -> str:
    lines = [f"\n### {op} [{n} x {k}], 1 row", "", "| kernel | us | TB/s | rel err |", "|---|---|---|---|"]
    for r in ([{**best, "kernel": f"fused int4 {tuple(best['tile'])}"}] if best else []) + current:
        if "us" in r:
            lines.append(
                f"| {r['kernel']} | {r['us']:.2f} | {r['TBps']:.2f} | {r.get('rel_err', float('nan')):.1e} |"
            )
        else:
            lines.append(f"| {r['kernel']} | - | - | {r.get('error', r.get('cut', ''))} |")
    return "\n".join(lines)


def merge(path: Path, gpu: str, results: list[dict]) -> None:
    """Write each op's winning tile into the table file (entries of other shapes kept)."""
    import triton

    old = json.loads(path.read_text()) if path.is_file() else {}
    tiles = {(t["op"], t["n"], t["k"]): t for t in old.get("tiles", [])}
    for res in results:
        if res["best"]:
            b = res["best"]
            tiles[(res["op"], res["n"], res["k"])] = {"op": res["op"], "n": res["n"], "k": res["k"],
                                                     "tile": b["tile"], "us": round(b["us"], 2)}  # fmt: skip
    out = {"gpu": gpu, "torch": torch.__version__, "triton": triton.__version__, "date": time.strftime("%Y-%m-%d"),
           "tiles": sorted(tiles.values(), key=lambda t: (t["op"], t["n"], t["k"]))}  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--shape", default="llama3-8b", choices=sorted(MODELS))
    p.add_argument("--budget-s", type=float, default=150.0)
    p.add_argument("--max-tiles", type=int, default=0, help="sweep only the first N tiles (0: all)")
    p.add_argument(
        "--tiles", help="sweep these tiles instead, e.g. 8x2x4x3x0,16x1x4x2x1 (BN x U x warps x stages x sz)"
    )
    p.add_argument("--json-out")
    p.add_argument("--merge-into")
    a = p.parse_args(argv)
    if a.device == "cpu" and "triton" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module imports triton
    from bench.int4_kernels import n_copies
    from lorafast_export.runtime.triton_fused_int4 import FUSED_INT4_TILES

    t0 = time.perf_counter()
    dev = torch.device(a.device)
    act = torch.bfloat16 if dev.type == "cuda" else torch.float32  # the interpreter's bf16 is not RNE
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else ""
    tiles = [tuple(int(v) for v in t.split("x")) for t in a.tiles.split(",")] if a.tiles else FUSED_INT4_TILES
    tiles = tiles[: a.max_tiles] if a.max_tiles else tiles
    shapes = op_shapes(a.shape)
    results = []
    for j, (op, n, k) in enumerate(shapes):
        copies = max(MIN_COPIES, n_copies(int4_bytes(n, k), dev)) if dev.type == "cuda" else 1
        case = Case(op, n, k, a.shape, dev, act, copies)
        current = current_kernels(case, gpu)
        left = a.budget_s - (time.perf_counter() - t0)
        rows, best = sweep(case, tiles, time.perf_counter() + left / (len(shapes) - j))
        res = {"op": op, "n": n, "k": k, "copies": copies, "best": best, "tiles": rows, "current": current}
        results.append(res)
        print(markdown(op, n, k, best, current), flush=True)
        del case
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    print(f"\n{time.perf_counter() - t0:.0f} s", flush=True)
    if a.json_out:
        Path(a.json_out).write_text(json.dumps({"gpu": gpu, "shape": a.shape, "results": results}, indent=1))
    if a.merge_into:
        merge(Path(a.merge_into), gpu, results)
    return results


if __name__ == "__main__":
    main()
