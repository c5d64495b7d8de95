"""The int4 fused decode kernels (runtime/triton_fused_int4.py) against the dequantized weight ((code - zero) *
scale from the codes, float64) through each op's math in float64, row i of a several-row call against the one-row
call bit for bit, and a tiny int4 model's decode through runtime/paged.py's fused_parts against its unfused int4
path. CUDA, or the CPU interpreter (float32 and float16 activations there: the interpreter's bfloat16 rounding is
not round-to-nearest-even, so bf16 activations run on CUDA only)."""
# ruff: noqa: I001 - tests.runtime.triton_device must be imported before any kernel module

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.runtime.triton_device import DEV  # first: sets the interpreter flag before triton loads
from lorafast_export.model.decoder import rotate_half
from lorafast_export.runtime import triton_fused_int4 as f4
from lorafast_export.runtime.triton_fused_int4 import (
    DEFAULT_INT4_TILES,
    add_norm_qkv_rope_int4,
    add_norm_qkv_rope_int4_launch,
    fused_gemv_int4,
    gemv_add_int4,
    gemv_add_int4_launch,
    gemv_int4_launch,
    norm_glu_int4,
    norm_glu_int4_launch,
)
from lorafast_export.runtime.triton_int4 import pack_scale_zero, pack_words
from tests.quant.helpers import random_qtensor
from tests.runtime.helpers import rope_inputs

DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEV == "cuda" else [])
TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}  # relative to the largest output
# (symmetric, group size, scale dtype), K and a tile: the default tile; 4 tiles an iteration over a ragged K
# (tiles past K, masked); wide rows reading the scale/zero words; the default with the scale/zero words and a
# group past K
CASES = [
    ((True, 128, torch.float16), 256, DEFAULT_INT4_TILES),
    ((False, 128, torch.bfloat16), 200, (16, 4, 2, 3, 0)),
    ((False, 256, torch.float16), 256, (32, 1, 4, 1, 1)),
    ((True, 256, torch.bfloat16), 200, (8, 2, 4, 3, 1)),
]


def _weight(rows: int, k: int, scheme, seed: int):
    """An int4 [rows, k] weight as the ops take it (words, scales, zeros, scale/zero words, group size) and its
    dequantized float64 values computed here from the codes."""
    sym, gs, sdt = scheme
    qt = random_qtensor(rows, k, 4, gs, sym, seed=seed, scale_dtype=sdt)
    zero = torch.full_like(qt.scales, 8, dtype=torch.float64) if sym else qt.zeros.double()
    per_col = lambda t: t.repeat_interleave(gs, 1)[:, :k]  # noqa: E731
    w = (qt.codes.double() - per_col(zero)) * per_col(qt.scales.double())
    s, z = qt.scales.to(DEV), None if sym else qt.zeros.to(DEV)
    return (pack_words(qt.codes).to(DEV), s, z, pack_scale_zero(s, z), gs), w


def _close(y: torch.Tensor, ref: torch.Tensor, dtype) -> bool:
    return bool((y.double().cpu() - ref).abs().max() <= TOL[dtype] * ref.abs().max().item())


def _inputs(rows: int, k: int, dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    h, d = (torch.randn(rows, k, generator=g).to(DEV, dtype) for _ in range(2))
    nw = (1 + 0.1 * torch.randn(k, generator=g)).to(DEV, dtype)
    return h, d, nw


def _normed(x: torch.Tensor, nw: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm in float64 of the rows as the kernel sees them (already in the activation dtype)."""
    x = x.double().cpu()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * nw.double().cpu()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scheme,k,tiles", CASES)
def test_gemv_and_gemv_add_are_the_dequantized_product(dtype, scheme, k, tiles):
    """36 output columns: not a multiple of BN 8 or 16."""
    q4, w = _weight(36, k, scheme, seed=k)
    a, r, _ = _inputs(3, k, dtype, seed=1)
    r = r[:, :36].contiguous()
    prod = a.double().cpu() @ w.T
    assert _close(gemv_int4_launch(a, q4, tiles), prod, dtype)
    assert _close(gemv_add_int4_launch(a, q4, r, tiles), r.double().cpu() + prod, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scheme,k,tiles", CASES)
def test_norm_glu_is_the_mlps_first_half(dtype, scheme, k, tiles):
    """silu(gate) * up of RMSNorm(x) through the fused int4 [gate; up] weight (20 columns of each)."""
    q4, w = _weight(40, k, scheme, seed=2)
    x, _, nw = _inputs(3, k, dtype, seed=3)
    gate, up = (_normed(x, nw, 1e-5) @ w.T).chunk(2, dim=-1)
    assert _close(norm_glu_int4_launch(x, nw, q4, 1e-5, tiles), F.silu(gate) * up, dtype)


def _qkv_case(rows, dtype, scheme, seed, hq=4, hkv=2, d=16, k=256, slots=40, bias=False):
    """An int4 [q; k; v] projection with its inputs, rows at scattered positions and slots, zeroed pools."""
    g = torch.Generator().manual_seed(seed)
    h, dl, nw = _inputs(rows, k, dtype, seed)
    q4, w = _weight((hq + 2 * hkv) * d, k, scheme, seed)
    b = (torch.randn(w.shape[0], generator=g) * 0.1).to(DEV, dtype) if bias else None
    cos, sin, slot, kp, vp = rope_inputs(g, rows, hkv, d, slots, dtype, DEV)
    return h, dl, nw, q4, w, b, cos, sin, kp, vp, slot


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_add_norm_qkv_rope_is_the_layers_first_half(dtype, case):
    """x = h + delta, qkv = RMSNorm(x) @ W^T (+ bias: odd cases), rope (the decoder's rotate_half) on q and k, k
    and v in the pools at the rows' slots and nothing else of the pools touched; GQA (4 q heads, 2 kv)."""
    scheme, k, tiles = CASES[case]
    hq, hkv, d, rows = 4, 2, 16, 3
    h, dl, nw, q4, w, b, cos, sin, kp, vp, slot = _qkv_case(
        rows, dtype, scheme, 11 + case, k=k, bias=case % 2 == 1
    )
    x, q = add_norm_qkv_rope_int4_launch(h, dl, nw, q4, 1e-5, b, cos, sin, kp, vp, slot, hq * d, tiles)
    assert torch.equal(x, (h.float() + dl.float()).to(dtype))  # rounded once, as the plain step's add
    qkv = _normed(x, nw, 1e-5) @ w.T + (b.double().cpu() if b is not None else 0)
    c, s = cos.double().cpu()[:, None], sin.double().cpu()[:, None]

    def rope(t, heads):  # [rows, heads * d] → [rows, heads, d]
        t = t.reshape(rows, heads, d)
        return t * c + rotate_half(t) * s

    assert _close(q.view(rows, hq, d), rope(qkv[:, : hq * d], hq), dtype)
    assert _close(kp[:, slot].transpose(0, 1), rope(qkv[:, hq * d : (hq + hkv) * d], hkv), dtype)
    assert _close(vp[:, slot].transpose(0, 1), qkv[:, (hq + hkv) * d :].reshape(rows, hkv, d), dtype)
    untouched = torch.ones(kp.shape[1], dtype=torch.bool)
    untouched[slot.cpu()] = False
    assert not kp[:, untouched.to(DEV)].any() and not vp[:, untouched.to(DEV)].any()


@pytest.mark.parametrize("scheme,k,tiles", CASES[1:3])
def test_rows_are_independent_of_the_other_rows(scheme, k, tiles):
    """Row i of a 3-row call equals the 1-row call bit for bit, for every op: a verify row is a decode step."""
    dtype = torch.bfloat16 if DEV == "cuda" else torch.float16
    h, d, nw = _inputs(3, k, dtype, seed=5)
    (q4, _), (q4glu, _) = (_weight(n, k, scheme, seed=n) for n in (48, 64))
    _, _, _, q4qkv, _, _, cos, sin, kp, vp, slot = _qkv_case(3, dtype, scheme, seed=13, k=k)

    def rope_call(i):  # q, then the k and v it wrote
        _, q = add_norm_qkv_rope_int4_launch(h[i], d[i], nw, q4qkv, 1e-5, None, cos[i], sin[i], kp, vp, slot[i], 64,
                                             tiles)  # fmt: skip
        return torch.cat(
            [q, kp[:, slot[i]].transpose(0, 1).flatten(1), vp[:, slot[i]].transpose(0, 1).flatten(1)], 1
        )

    calls = [
        lambda i: gemv_int4_launch(h[i], q4, tiles),
        lambda i: gemv_add_int4_launch(h[i], q4, d[i][:, :48], tiles),
        lambda i: norm_glu_int4_launch(h[i], nw, q4glu, 1e-5, tiles),
        rope_call,
    ]
    for call in calls:
        three = call(slice(0, 3))
        assert all(torch.equal(call(slice(i, i + 1))[0], three[i]) for i in range(3))


def test_bad_inputs_are_refused():
    scheme = (False, 128, torch.float16)
    q4, _ = _weight(32, 256, scheme, seed=7)
    x = torch.zeros(2, 256, device=DEV)
    with pytest.raises(ValueError, match="at most 8 rows"):
        gemv_int4_launch(torch.zeros(9, 256, device=DEV), q4, DEFAULT_INT4_TILES)
    with pytest.raises(ValueError, match="multiple of 128"):
        gemv_int4_launch(x, (*q4[:4], 64), DEFAULT_INT4_TILES)  # groups narrower than a word tile
    with pytest.raises(ValueError, match="scales"):
        gemv_int4_launch(torch.zeros(2, 384, device=DEV), q4, DEFAULT_INT4_TILES)  # K of another weight
    with pytest.raises(ValueError, match="not pack_words"):
        gemv_int4_launch(x, (q4[0][:, :8], *q4[1:]), DEFAULT_INT4_TILES)
    with pytest.raises(ValueError, match="zero points"):
        gemv_int4_launch(x, (q4[0], q4[1], q4[2].int(), *q4[3:]), DEFAULT_INT4_TILES)
    h, dl, nw, q4qkv, _, _, cos, sin, kp, vp, slot = _qkv_case(2, torch.float32, scheme, seed=8)
    with pytest.raises(ValueError, match="k pool"):
        add_norm_qkv_rope_int4_launch(
            h, dl, nw, q4qkv, 1e-5, None, cos, sin, kp[:1], vp, slot, 64, DEFAULT_INT4_TILES
        )


def test_ops_use_their_measured_tiles(monkeypatch):
    """The registered ops (what torch.compile sees) run the table's tile for their (op, n, k): the launch with that
    tile, bit for bit."""
    scheme, k = (False, 128, torch.bfloat16), 256
    (q4, _), (q4glu, _) = (_weight(n, k, scheme, seed=n) for n in (32, 64))
    h, d, nw = _inputs(2, k, torch.float32, seed=9)
    tile = (16, 1, 4, 2, 1)
    for key in [("gemv", 32, k), ("gemv_add", 32, k), ("norm_glu", 64, k), ("add_norm_qkv_rope", 128, k)]:
        monkeypatch.setitem(f4.FUSED_INT4_TABLE, key, tile)
    assert torch.equal(fused_gemv_int4(h, *q4), gemv_int4_launch(h, q4, tile))
    r = d[:, :32].contiguous()
    assert torch.equal(gemv_add_int4(h, *q4, r), gemv_add_int4_launch(h, q4, r, tile))
    assert torch.equal(norm_glu_int4(h, nw, *q4glu, 1e-5), norm_glu_int4_launch(h, nw, q4glu, 1e-5, tile))
    _, _, _, q4qkv, _, _, cos, sin, kp, vp, slot = _qkv_case(2, torch.float32, scheme, seed=10)
    kp2, vp2 = kp.clone(), vp.clone()
    x, q = add_norm_qkv_rope_int4(h, d, nw, *q4qkv, 1e-5, None, cos, sin, kp, vp, slot, 64)
    x2, q2 = add_norm_qkv_rope_int4_launch(h, d, nw, q4qkv, 1e-5, None, cos, sin, kp2, vp2, slot, 64, tile)
    assert torch.equal(q, q2) and torch.equal(kp, kp2) and torch.equal(vp, vp2)


def _teacher_forced(pm, cache, ids: torch.Tensor, n: int) -> torch.Tensor:
    """Logits [len(ids), V] of a prefill of ids[:n], then one batch-1 decode step per further token."""
    cache.reserve(0, len(ids))
    rows = [pm.prefill(ids[None, :n].to(DEV), cache.slots(0, 0, n).to(DEV), last_only=False)[0]]
    tables = cache.block_table([0], 8, 1).to(DEV)
    for i in range(n, len(ids)):
        pos = torch.tensor([i], device=DEV)
        rows.append(pm(ids[i : i + 1].to(DEV), pos, tables, pos + 1, cache.slots(0, i, i + 1).to(DEV)))
    return torch.cat(rows).float().cpu()


def test_int4_decode_through_fused_parts_gives_the_unfused_tokens(tmp_path, monkeypatch):
    """A tiny int4 model (asymmetric g128, fp16 activations) whose four shapes count as measured: its layers fuse
    (their linears built the word layout for it at load, though their plan reads qform's nibbles), and teacher-
    forced decode steps give the unfused int4 path's logits closely and its greedy tokens. Without a measured
    tile for one shape no layer fuses."""
    from lorafast_export.runtime.paged import fusable_layer, use_fused_decode
    from tests.runtime.helpers import paged, quantize_all, tiny_checkpoint

    md = tiny_checkpoint(tmp_path, hidden=128, intermediate_size=192)  # 4 heads of 32, 2 kv heads
    fp, q = quantize_all(md, group_size=128)
    unfused, cache = paged(md, fp, q, dtype=torch.float16, kernel="triton", device=DEV)
    assert unfused.dec.model.layers[0].mlp.down_proj.weight_words is None  # nothing asked for it
    shapes = [
        ("add_norm_qkv_rope", 256, 128),
        ("gemv_add", 128, 128),
        ("norm_glu", 384, 128),
        ("gemv", 128, 192),
    ]
    for key in shapes:
        monkeypatch.setitem(f4.FUSED_INT4_TABLE, key, (32, 1, 4, 2, 1))
    fused, cache2 = paged(md, fp, q, dtype=torch.float16, kernel="triton", device=DEV)
    assert use_fused_decode(fused.dec) == md.config.num_layers
    ids = torch.randint(0, 96, (10,), generator=torch.Generator().manual_seed(0))
    want, got = _teacher_forced(unfused, cache, ids, 6), _teacher_forced(fused, cache2, ids, 6)
    assert (got - want).abs().max() <= 2e-2 * want.abs().max()
    assert torch.equal(got[6:].argmax(-1), want[6:].argmax(-1))
    monkeypatch.delitem(f4.FUSED_INT4_TABLE, shapes[3])
    assert not any(fusable_layer(layer) for layer in fused.dec.model.layers)


def test_bench_dry_run_writes_a_table_the_module_reads(tmp_path, monkeypatch):
    """bench/int4_fused_bench.py (the interpreter on a CPU; one tile, tiny shapes; a process of its own: tests do
    not import bench/): every op's tile is checked correct and wins, and --merge-into writes them where
    `load_fused_int4_table` finds them for that GPU name."""
    root = Path(__file__).resolve().parents[2]
    path, rows = tmp_path / "fused_int4_test_gpu.json", tmp_path / "rows.json"
    cmd = [sys.executable, str(root / "bench" / "int4_fused_bench.py"), "--device", DEV, "--shape", "tiny"]
    cmd += ["--tiles", "32x1x4x2x1", "--merge-into", str(path), "--json-out", str(rows)]
    env = {**os.environ, "PYTHONPATH": str(root)}
    subprocess.run(cmd, cwd=root, env=env, check=True, capture_output=True, timeout=600)
    results = json.loads(rows.read_text())["results"]
    bound = 1e-3 if DEV == "cpu" else 1e-2  # bf16 activations on CUDA
    assert all(r["best"] and r["best"]["rel_err"] < bound for r in results)
    assert all("us" in c for r in results for c in r["current"] if not c["kernel"].startswith("tinygemm"))
    monkeypatch.setattr(f4, "TABLE_DIR", tmp_path)
    table = f4.load_fused_int4_table("Test GPU")
    assert table == {(r["op"], r["n"], r["k"]): (32, 1, 4, 2, 1) for r in results}
