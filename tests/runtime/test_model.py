"""Paged prefill + decode computes what the canonical decoder computes over the whole sequence."""

import pytest
import torch

from lorafast_export.model.decoder import load_decoder
from lorafast_export.qform import ACT_QUANT_INT8_PER_TOKEN, with_fields
from lorafast_export.runtime.paged import pack_segments
from tests.runtime.helpers import fake_quant_decoder, fp_state, paged, quantize_all, tiny_checkpoint

CASES = [("llama", {}), ("mistral", {"sliding_window": 6}), ("qwen2", {"tie": True})]


@torch.no_grad()
def paged_logits(pm, cache, ids, prefill_len):
    """Prefill ids[:prefill_len], then decode the rest one token at a time (B=1, padded to 2 rows)."""
    seq = 0
    cache.reserve(seq, prefill_len)
    rows = [pm.prefill(ids[None, :prefill_len], cache.slots(seq, 0, prefill_len), last_only=False)[0]]
    for pos in range(prefill_len, len(ids)):
        cache.reserve(seq, pos + 1)
        tables = cache.block_table([seq], width=8, rows=2)
        out = pm(
            torch.tensor([ids[pos], 0]),
            torch.tensor([pos, 0]),
            tables,
            torch.tensor([pos + 1, 1]),
            torch.tensor([int(cache.slots(seq, pos, pos + 1)), 0]),
        )
        rows.append(out[:1])
    return torch.cat(rows)


@pytest.mark.parametrize("family,kw", CASES, ids=[c[0] for c in CASES])
def test_paged_decode_equals_full_sequence_logits(tmp_path, family, kw):
    md = tiny_checkpoint(tmp_path, family, **kw)
    ids = torch.randint(0, 96, (21,))
    ref = load_decoder(md)(ids[None])[0][0]
    pm, cache = paged(md)
    assert (paged_logits(pm, cache, ids, 7) - ref).abs().max() < 1e-4


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_w8a8_runtime_equals_fake_quant_reference(tmp_path, compiled):
    """A SmoothQuant model (int8 per-channel weights, int8 per-token activations) runs every linear, the
    fused q/k/v and gate/up included, through the int8 GEMM (W8A8Linear) and computes the fake-quant
    reference's logits; compiled: its prefill through inductor's lowering of the int8 GEMM."""
    md = tiny_checkpoint(tmp_path, hidden=128, intermediate_size=256)
    fp, q = quantize_all(md, 8, -1, True)
    q = {p: with_fields(qt, act_quant=ACT_QUANT_INT8_PER_TOKEN) for p, qt in q.items()}
    ref = fake_quant_decoder(md, q)
    pm, cache = paged(md, fp, q)
    assert {type(m).__name__ for m in pm.dec.modules() if hasattr(m, "kernel")} == {"W8A8Linear"}
    if compiled:
        pm.compile_prefill()
    ids = torch.randint(0, 96, (12,))
    with torch.no_grad():
        want = ref(ids[None])[0][0]
    assert (paged_logits(pm, cache, ids, 6) - want).abs().max() < 1e-3 * want.abs().max()


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_decode_equals_gather(tmp_path):
    md = tiny_checkpoint(tmp_path)
    ids = torch.randint(0, 96, (15,))
    ref = load_decoder(md)(ids[None])[0][0]
    pm, cache = paged(md, attention="flex")
    assert (paged_logits(pm, cache, ids, 5) - ref).abs().max() < 1e-4


@pytest.mark.parametrize(
    "bits,group,sym,dtype,kernel",
    [
        (4, 32, False, torch.float32, "Int4Linear"),
        (4, 64, True, torch.float32, "Int4Linear"),
        (8, -1, True, torch.bfloat16, "Int8Linear"),  # aten's int8 product: bf16/fp16 activations on the CPU
        (8, -1, False, torch.bfloat16, "Int8Linear"),
        (
            8,
            -1,
            True,
            torch.float32,
            "DequantLinear",
        ),  # float32: the dense weight (faster, TORCH.md session 35)
    ],
)
def test_quantized_runtime_equals_fake_quant_reference(tmp_path, bits, group, sym, dtype, kernel):
    md = tiny_checkpoint(tmp_path, hidden=128, intermediate_size=256)  # tinygemm needs in % 128 == 0
    fp, q = quantize_all(md, bits, group, sym)
    ref = fake_quant_decoder(md, q)
    pm, cache = paged(md, fp, q, dtype=dtype)
    kernels = {type(m).__name__ for m in pm.dec.modules() if hasattr(m, "kernel")}
    assert kernels == {kernel}
    ids = torch.randint(0, 96, (12,))
    with torch.no_grad():
        want = ref(ids[None])[0][0]
    if dtype == torch.float32:
        assert (paged_logits(pm, cache, ids, 6) - want).abs().max() < 1e-3 * want.abs().max()
    else:  # bf16 drifts from the float32 reference by itself: against the same runtime on dense bf16 weights
        dense_pm, dense_cache = paged(md, fp, q, dtype=dtype, kernel="dequant")
        dense = paged_logits(dense_pm, dense_cache, ids, 6).float()
        got = paged_logits(pm, cache, ids, 6).float()
        # bf16 logits of this random 2-layer model move 2-3% (norm) with any change of rounding: the dense bf16
        # runtime from the float32 reference, and Int8Linear (bf16 scales, its own product order) from it
        assert (dense - want).norm() < 5e-2 * want.norm()
        assert (got - dense).norm() < 5e-2 * dense.norm()


def test_triton_attention_refuses_shapes_it_cannot_tile(tmp_path):
    md = tiny_checkpoint(tmp_path)  # head_dim 8
    from lorafast_export.errors import InputError

    with pytest.raises(InputError, match="power-of-two head_dim >= 16 \\(got 8\\)"):
        paged(md, attention="triton", block_size=16)


def test_projections_are_fused_at_load(tmp_path):
    md = tiny_checkpoint(tmp_path)
    pm, _ = paged(md)
    attn, mlp = pm.dec.model.layers[0].self_attn, pm.dec.model.layers[0].mlp
    assert attn.qkv_proj.weight.shape[0] == (attn.n_heads + 2 * attn.n_kv) * attn.head_dim
    assert attn.q_proj is None and mlp.gate_proj is None and mlp.gate_up_proj is not None


@pytest.mark.parametrize("family,kw", CASES[:2], ids=[c[0] for c in CASES[:2]])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_packed_prefill_equals_each_prompt_alone(tmp_path, family, kw, compiled):
    """Prompts packed back to back (one forward, no padding through the linears; mistral: its window)
    give each prompt's own logits at its last token and write each prompt's own k/v."""
    md = tiny_checkpoint(tmp_path, family, **kw)
    dec = load_decoder(md)
    lens = [9, 1, 14, 4]
    prompts = [torch.randint(0, 96, (n,)) for n in lens]
    pm, cache = paged(md)
    if compiled:
        pm.compile_prefill()
    for i, n in enumerate(lens):
        cache.reserve(i, n)
    slots = torch.cat([cache.slots(i, 0, n) for i, n in enumerate(lens)])
    last = torch.tensor(lens).cumsum(0) - 1
    got = pm.prefill(torch.cat(prompts)[None], slots, last_index=last, segments=pack_segments(lens))
    with torch.no_grad():
        want = torch.stack([dec(p[None])[0][0, -1] for p in prompts])
    assert (got - want).abs().max() < 1e-4
    ref_pm, ref_cache = paged(md)  # the k/v each prompt writes alone
    for i, (n, p) in enumerate(zip(lens, prompts, strict=True)):
        ref_cache.reserve(i, n)
        ref_pm.prefill(p[None], ref_cache.slots(i, 0, n))
        s = cache.slots(i, 0, n)
        for pool, ref_pool in zip(cache.k + cache.v, ref_cache.k + ref_cache.v, strict=True):
            assert (pool[:, s] - ref_pool[:, ref_cache.slots(i, 0, n)]).abs().max() < 1e-5


CHUNKED = [(*c, False) for c in CASES] + [(*c, True) for c in CASES[:2]]


@pytest.mark.parametrize(
    "family,kw,compiled", CHUNKED, ids=[f"{c[0]}-{'compiled' if c[2] else 'eager'}" for c in CHUNKED]
)
def test_chunked_prefill_equals_the_whole_sequence(tmp_path, family, kw, compiled):
    """A prompt prefilled in chunks (the first through prefill, each later one on top of the cached prefix:
    PagedModel.chunk, eager or through the compiled chunk layer) gives, at each chunk's last token, the
    canonical decoder's logits over the whole sequence, and a decode step after it continues from the right
    cache (mistral: its window of 6 spans chunks of 4, so a chunk sees keys only partly)."""
    md = tiny_checkpoint(tmp_path, family, **kw)
    ids = torch.randint(0, 96, (23,))
    with torch.no_grad():
        ref = load_decoder(md)(ids[None])[0][0]  # [23, V]
    pm, cache = paged(md)
    if compiled:
        pm.compile_prefill()
    cache.reserve(0, 23)
    n, chunk, worst = 22, 4, 0.0
    for start in range(0, n, chunk):
        end = min(start + chunk, n)
        piece, slots = ids[None, start:end], cache.slots(0, 0, end)
        got = pm.prefill(piece, slots) if start == 0 else pm.chunk(piece, start, slots)
        worst = max(worst, float((got[0] - ref[end - 1]).abs().max()))
    tables = cache.block_table([0], width=8, rows=2)
    step = pm(
        torch.tensor([int(ids[n]), 0]),
        torch.tensor([n, 0]),
        tables,
        torch.tensor([n + 1, 1]),
        torch.tensor([int(cache.slots(0, n, n + 1)), 0]),
    )
    worst = max(worst, float((step[0] - ref[n]).abs().max()))
    assert worst < 1e-4


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_rope_table_gives_the_rotarys_values_and_the_runtime_uses_it(tmp_path, family):
    """RopeTable: cos and sin looked up by position are the decoder's Rotary's, bit for bit, for a step's [b, 1]
    positions and a chunk's [1, s]; a position past the table reads its last row; another dtype computes them.
    The runtime's decoder holds one of max_seq_len positions."""
    from lorafast_export.model.decoder import Rotary
    from lorafast_export.runtime import loader
    from lorafast_export.runtime.options import RuntimeOptions
    from lorafast_export.runtime.paged import RopeTable

    md = tiny_checkpoint(tmp_path, family)
    rotary = Rotary(md.config)
    table = RopeTable(rotary, 40, torch.float32)
    for pos in (torch.tensor([[0], [7], [39]]), torch.arange(3, 17)[None], torch.tensor([5, 1])):
        for got, want in zip(table(pos, torch.float32), rotary(pos, torch.float32), strict=True):
            assert got.shape == want.shape and torch.equal(got, want)
    past = table(torch.tensor([[39], [45]]), torch.float32)
    assert all(torch.equal(t[0], t[1]) for t in past)
    half = table(torch.tensor([[3]]), torch.bfloat16)
    assert half[0].dtype == torch.bfloat16 and torch.equal(
        half[0], rotary(torch.tensor([[3]]), torch.bfloat16)[0]
    )
    rt = loader.build_runtime(
        md.config, fp_state(md), None, "cpu", torch.float32, RuntimeOptions(max_seq_len=24)
    )
    assert isinstance(rt.model.dec.rotary, RopeTable) and rt.model.dec.rotary.n == 24
