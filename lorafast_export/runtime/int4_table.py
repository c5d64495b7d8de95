"""Which int4 kernel runs a linear of a given shape, from a table measured on the GPU (not a guess).

runtime/kernel_tune.py times, per linear shape [N, K] and per row bucket, the dense bf16 matmul, torch's
tinygemm, our Triton GEMV/GEMM tiles (runtime/triton_int4.py) and our CUDA tensor-core kernel, each call replayed
from a CUDA graph as the runtime runs it. bench/int4_kernels.py writes the tables we ship
(lorafast_export/data/kernels/int4_<gpu>.json); `lorafast-export tune-kernels` measures a model's shapes on the
user's GPU into LORAFAST_CACHE/kernels/, which is read first. At load:
- a layer whose shape the table holds, on the GPU it was measured on, gets per row bucket the fastest
  measured kernel: tinygemm, or a Triton GEMV/GEMM tile (a layer whose plan mixes both keeps both weight
  packings, 0.5 + 0.5 byte per weight);
- any other shape or GPU (CUDA compute capability 8.0 or newer, groups of a multiple of 128 columns) runs our
  GEMM_W kernel at every row count with tiles chosen from the layer's shape and the GPU's SM count
  (`untabled_plan`: the rule reproduces the tiles the H100's and H200's tables measured fastest for GEMM_W; on both
  GPUs GEMM_W was about as fast as tinygemm at one row and 2-11x faster from 8 rows on, bench/TORCH.md session 32);
  older GPUs and other groups keep tinygemm where it applies.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

TABLE_DIR = Path(__file__).resolve().parents[1] / "data" / "kernels"
TRITON_GROUPS = (32, 64, 128, 256)  # group sizes the Triton kernels take (a GEMV tile holds whole groups)


def gpu_slug(gpu: str) -> str:
    """A GPU's name as the measured tables' file names spell it: "NVIDIA H200" → "h200"."""
    return gpu.lower().replace("nvidia ", "").replace(" ", "_")


def table_file(gpu: str, bits: int = 4) -> Path:
    return TABLE_DIR / f"int{bits}_{gpu_slug(gpu)}.json"


def user_table_file(gpu: str, bits: int = 4) -> Path:
    """The table `lorafast-export tune-kernels` measured on this machine's GPU (read before the shipped one)."""
    from lorafast_export.stagecache import cache_root

    return cache_root() / "kernels" / f"int{bits}_{gpu_slug(gpu)}.json"


@lru_cache(maxsize=8)
def load_table(gpu: str, bits: int = 4) -> dict | None:
    """This GPU's measured table: the user's (tune-kernels), else the shipped one, else None."""
    from lorafast_export.errors import InputError

    for path in (user_table_file(gpu, bits), table_file(gpu, bits)):
        if path.is_file():
            try:
                return json.loads(path.read_text())
            except ValueError as e:
                raise InputError(
                    f"{path}: not a kernel table ({e}). Delete it, or measure it again with "
                    "`lorafast-export tune-kernels`."
                ) from e
    return None


def layer_shapes(dims: tuple[int, int, int, int, int]) -> list[tuple[int, int]]:
    """A decoder layer's fused linear shapes [N, K] (qkv, o, gate_up, down) from (hidden, intermediate, heads,
    kv heads, head dim)."""
    h, i, hq, hkv, d = dims
    return [((hq + 2 * hkv) * d, h), (h, hq * d), (2 * i, h), (h, i)]


def shape_row(table: dict | None, n: int, k: int) -> dict | None:
    """A measured table's row for an [n, k] linear (its cells per row bucket), or None."""
    return next((r for r in (table or {}).get("shapes", []) if (r["n"], r["k"]) == (n, k)), None)


def fused_mma_layout(gpu: str, op: str, n: int, k: int) -> list[int] | None:
    """The measured block layout [warps per block, blocks per SM, variant bits] of runtime/cuda_int4.py's fused
    decode op `op` for an [n, k] weight on this GPU at one row (bench/mma_fused_bench.py --merge-into: the
    table's "fused_mma" section), or None: an unmeasured shape is not fused."""
    cell = ((load_table(gpu) or {}).get("fused_mma", {}).get(op) or {}).get(f"{n}x{k}")
    return list(cell["layout"]) if cell else None


KERNEL_CELLS = (
    "gemv",
    "gemm",
    "gemv_t",
    "gemm_t",
    "gemm_w",
    "gemv_w",
    "dequant",
    "mma",
)  # a cell's measured kernels
TINYGEMM_ENTRY = [2, 0, 0, 1, 0, 0]  # kind TINYGEMM (runtime/triton_int4.py); tile fields unused


def _best(cell: dict, allow_tinygemm: bool) -> tuple[float, list[int]] | None:
    """(microseconds, entry without its row bound) of the cell's fastest measured kernel."""
    runs = [(cell[k]["us"], cell[k]["entry"][1:]) for k in KERNEL_CELLS if cell.get(k) and cell[k]["us"]]
    if allow_tinygemm and cell.get("tinygemm_us"):
        runs.append((cell["tinygemm_us"], TINYGEMM_ENTRY))
    return min(runs, key=lambda r: r[0]) if runs else None


def plan_from_table(
    table: dict | None, n: int, k: int, allow_tinygemm: bool = True
) -> tuple[str, list[int]] | None:
    """('int4_triton', flat plan) or ('int4_tinygemm', []) for an [n, k] linear; None if not measured.
    Per row bucket the fastest measured kernel (tinygemm too where the layer fits it)."""
    row = shape_row(table, n, k)
    if row is None:
        return None
    buckets = sorted(row["rows"], key=int)
    best = [(int(b), _best(row["rows"][b], allow_tinygemm)) for b in buckets]
    if any(v is None for _, v in best):
        return None
    if all(v[1] == TINYGEMM_ENTRY for _, v in best):
        return ("int4_tinygemm", [])
    return ("int4_triton", [x for b, v in best for x in (b, *v[1])])


def default_plan() -> list[int]:
    """Tiles for a forced `kernel=triton` on a shape the table lacks: GEMV up to 4 rows, then GEMM."""
    return [4, 0, 32, 256, 1, 16, 4, 1 << 30, 1, 64, 64, 1, 32, 4]


GEMM_W_KIND = 5  # runtime/triton_int4.GEMM_W (not imported here: that module imports triton)
SZ_WORDS = 32  # a GEMM_W entry's option bit: scales and zero points read as one int32 (pack_scale_zero)
UNTABLED_BUCKETS = ((16, 16), (32, 32), (64, 64), (256, 64))  # (max rows, BM) of untabled_plan's entries


def untabled_plan(n: int, k: int, sms: int) -> list[int]:
    """The int4 plan for an [n, k] linear that no measured table holds (this GPU's, or this shape on it): GEMM_W
    on the word layout at every row count, tiles by rule. BN 128 for a large weight (n * k > 2^25: gate_up and
    down at 8B), else 64; BM the bucket's rows (16, 32, 64; 64 beyond); split-K the smallest power of two
    that puts 1.6 programs or more on every SM (while each split keeps two or more 128-column tiles), and none
    beyond 256 rows, where the row blocks fill the GPU. On the H100's table this is the measured fastest
    GEMM_W tile in 18 of the 20 cells of the 8B shapes at 1-64 rows, and at most 2.4% off it in the other two
    (tests/runtime/test_kernel_tune.py)."""
    bn = 128 if n * k > 1 << 25 else 64
    tiles = -(-n // bn)
    plan = []
    for rows, bm in UNTABLED_BUCKETS:
        splits = 1
        while tiles * (rows // bm) * splits < 1.6 * sms and splits < 16 and k // 128 // (2 * splits) >= 2:
            splits *= 2
        plan += [rows, GEMM_W_KIND, bn, SZ_WORDS, splits, bm, 4]
    return plan + [1 << 30, GEMM_W_KIND, bn, SZ_WORDS, 1, 64, 4]


DECODE_ROWS = 32  # int8 row buckets up to here are decode steps; those above, prefills
DEQUANT_KIND = 7  # runtime/triton_int4.DEQUANT (not imported here: that module imports triton)
PREFILL_DEQUANT = [1 << 30, DEQUANT_KIND, 32, 256, 1, 16, 4]  # rows past a table measured to decode rows only


def int8_plan_from_table(table: dict | None, n: int, k: int) -> list[int] | None:
    """The int8 plan for an [n, k] per-channel linear from `bench/torch_bench.py --sections int8k
    --int8-table` (int8_<gpu>.json): per measured row bucket its fastest entry (a Triton tile, or DEQUANT: the
    codes dequantized per call, then cuBLAS), the last bucket's entry covering every larger row count.
    None (the layer stays dequantized to a resident bf16 weight) unless the shape was measured and int8 beat
    the bf16 matmul in every decode bucket (up to DECODE_ROWS rows). The buckets above are prefills: they run
    the fastest int8 entry even where bf16 was faster, since the layer keeps only its codes (half of bf16's
    bytes) and cannot switch to a dense copy per bucket. A table with no prefill bucket (measured before
    session 35) gets DEQUANT past its last bucket: its last tile was never timed on a prefill's rows."""
    row = shape_row(table, n, k)
    if row is None or not row["rows"]:
        return None
    buckets = sorted(int(b) for b in row["rows"])
    cells = [row["rows"][str(b)] for b in buckets]
    if buckets[0] > DECODE_ROWS or any(c.get("us") is None for c in cells):
        return None
    if not all(c["us"] < c["bf16_us"] for b, c in zip(buckets, cells) if b <= DECODE_ROWS):
        return None
    tail = PREFILL_DEQUANT if buckets[-1] <= DECODE_ROWS else []
    if not tail:
        buckets[-1] = 1 << 30  # the last measured prefill bucket covers every larger row count
    return [x for b, c in zip(buckets, cells) for x in (b, *c["entry"][1:])] + tail
