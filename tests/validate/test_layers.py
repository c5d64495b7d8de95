"""The streamed reference (our unmerged LoRA/DoRA forward, validate/layers.py) equals PEFT's unmerged model, and
the layer-streamed walk equals the whole-model forward of every stage."""

import copy

import peft
import pytest
import torch

from lorafast_export.adapters import open_adapter
from lorafast_export.merge import merged_state, plan_merge
from lorafast_export.model.decoder import build_decoder
from lorafast_export.model.quantized import fake_quant_decoder
from lorafast_export.validate.layers import (
    MergedSource,
    QuantizedSource,
    StoreSource,
    UnmergedSource,
)
from lorafast_export.validate.stream import Stage, StageLogits, walk
from lorafast_export.weights import open_model
from tests.merge.test_merge_vs_peft import ALL, CASES, make_adapter, peft_case
from tests.tiny import hf_logits, make_model, save_model

TOL = 1e-5  # fp32: issue 13's bound for the streamed reference against PEFT


def _ours(source, ids):
    """Logits of a LayerSource through the streamed walk, and through its whole-model decoder."""
    hidden = walk([source], ids, "cpu")
    sl = StageLogits([Stage(source.name, source)], hidden, ids, "cpu")
    streamed = torch.stack([sl.heads[source.name](hidden[source.name][b]) for b in range(ids.shape[0])])
    whole = source.decoder("cpu")(ids)[0]
    return streamed, whole


@pytest.mark.parametrize("case", list(CASES))
def test_unmerged_reference_equals_peft(tmp_path, case):
    base, pm, ids, ref = peft_case(tmp_path, case)
    plan = plan_merge(open_model(tmp_path / "base"), [open_adapter(str(tmp_path / "ad"))])
    streamed, whole = _ours(UnmergedSource(plan, "base"), ids)
    assert (streamed - ref).abs().max().item() <= TOL, case
    assert (whole - ref).abs().max().item() <= TOL, case
    assert (ref - hf_logits(base, ids)).abs().max().item() > 1e-2, "the adapter must change the model"
    # the bare base stage is PEFT with its adapters disabled
    with pm.disable_adapter():
        bare = hf_logits(pm, ids)
    b_streamed, _ = _ours(StoreSource("base", plan.base.config, plan.base.store), ids)
    assert (b_streamed - bare).abs().max().item() <= TOL


def _two_adapters(tmp_path, b_kw, weights):
    base = make_model("llama")
    save_model(base, tmp_path / "base")
    make_adapter(base, tmp_path / "a", seed=1, target_modules=["q_proj", "up_proj", "v_proj"])
    make_adapter(base, tmp_path / "b", seed=2, **b_kw)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a", adapter_name="a")
    pm.load_adapter(tmp_path / "b", adapter_name="b")
    with torch.no_grad():
        for n, p in pm.named_parameters():
            for name, w in zip("ab", weights, strict=True):
                if f"lora_B.{name}" in n:
                    p.mul_(w)
    pm.base_model.set_adapter(["a", "b"])
    ads = [open_adapter(f"{tmp_path / n}:{w}") for n, w in zip("ab", weights, strict=True)]
    return pm, plan_merge(open_model(tmp_path / "base"), ads)


def test_weighted_adapters_equal_peft(tmp_path):
    pm, plan = _two_adapters(tmp_path, dict(target_modules=["v_proj", "down_proj"], r=2), (0.7, 0.3))
    ids = torch.randint(0, 96, (2, 20))
    streamed, _ = _ours(UnmergedSource(plan, "base"), ids)
    assert (streamed - hf_logits(pm, ids)).abs().max().item() <= TOL


def test_lora_plus_dora_equal_peft(tmp_path):
    pm, plan = _two_adapters(
        tmp_path, dict(target_modules=["q_proj", "down_proj"], use_dora=True), (1.0, 1.0)
    )
    ids = torch.randint(0, 96, (2, 20))
    streamed, _ = _ours(UnmergedSource(plan, "base"), ids)
    assert (streamed - hf_logits(pm, ids)).abs().max().item() <= TOL


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("walk")
    base = make_model("llama", layers=3)
    save_model(base.half(), root / "base")
    make_adapter(base, root / "ad", target_modules=ALL, use_dora=True)
    plan = plan_merge(open_model(root / "base"), [open_adapter(str(root / "ad"))])
    return plan


def test_walk_equals_whole_model_merged(built):
    """merged-fp32 and merged-fp16 streamed on the device equal the whole merged decoder (merge/stream.py)."""
    plan = built
    ids = torch.randint(0, 96, (3, 16))
    for dtype, round_to in ((torch.float32, None), (torch.float16, "base")):
        whole = build_decoder(plan.base.config, merged_state(plan, dtype))(ids)[0]
        streamed, built_whole = _ours(MergedSource("m", plan, "base", round_to), ids)
        assert (streamed - whole).abs().max().item() <= 1e-5
        assert (built_whole - whole).abs().max().item() <= 1e-5


def test_walk_equals_whole_model_quantized(built):
    from lorafast_export.model.quantized import QuantizedModel
    from lorafast_export.model.spec import linear_module_names
    from lorafast_export.quant.rtn import quantize_rtn

    plan = built
    state = merged_state(plan, torch.float32)
    mods = [m for i in range(plan.base.config.num_layers) for m in linear_module_names(i)]
    q = {m: quantize_rtn(state[m + ".weight"], 4, 16, symmetric=False) for m in mods}
    fp = {k: v for k, v in state.items() if k.removesuffix(".weight") not in q}
    qm = QuantizedModel(plan.base.config, fp, q, {"method": "rtn"})
    ids = torch.randint(0, 96, (2, 16))
    whole = fake_quant_decoder(qm)(ids)[0]
    streamed, _ = _ours(QuantizedSource("quantized", qm), ids)
    assert (streamed - whole).abs().max().item() <= 1e-5


def test_walk_carries_all_stages_together(built):
    """Several stages in one walk give each its own logits (shared per-layer reads do not leak between them)."""
    plan = built
    ids = torch.randint(0, 96, (2, 16))
    sources = [
        UnmergedSource(plan, "base"),
        StoreSource("base", plan.base.config, plan.base.store, key="base"),
    ]
    sources.append(MergedSource("merged-fp32", plan, "base"))
    hidden = walk(sources, ids, "cpu")
    sl = StageLogits([Stage(s.name, s) for s in sources], hidden, ids, "cpu")
    for s in sources:
        alone = _ours(s, ids)[0]
        together = torch.stack([sl.block(Stage(s.name, s), b) for b in range(2)])
        assert torch.equal(alone[:, :-1], together), s.name


@pytest.mark.parametrize("method", ["int8", "awq"])
def test_trtllm_bundle_read_layer_by_layer_equals_whole_reading(tmp_path, method):
    """The trt-llm artifact stage streamed from the bundle (LazyHFBundle) computes what the whole-model reading
    (reader.reference_decoder, TensorRT-LLM's dequantization and casts) computes; engine checkpoints run whole."""
    from lorafast_export.targets.registry import get_target
    from tests.targets.test_trtllm import QUANTIZERS, _lowered, merged_model, quantized

    merged = merged_model(tmp_path)
    qm = quantized(merged, QUANTIZERS[method])
    session = get_target("trt-llm").load(_lowered(merged, qm, tmp_path / "b", {}))
    ids = torch.randint(0, 96, (2, 10))
    streamed, _ = _ours(session.layer_source(), ids)
    assert torch.allclose(streamed, session.logits(ids), rtol=0, atol=1e-5)
    legacy = get_target("trt-llm").load(_lowered(merged, qm, tmp_path / "l", {"legacy": True}))
    assert legacy.layer_source() is None


def test_quantized_stage_records_weight_errors_against_the_rounded_merge(built):
    """Per-layer weight errors come from the walk: ||dequant - W|| / ||W||, W the merge rounded to the
    checkpoint dtype (fp16 here), computed directly from merged_state for the check."""
    from lorafast_export.model.quantized import QuantizedModel
    from lorafast_export.model.spec import linear_module_names
    from lorafast_export.qform import dequantize
    from lorafast_export.quant.rtn import quantize_rtn

    plan = built
    state16 = merged_state(plan, torch.float16)
    mods = [m for i in range(plan.base.config.num_layers) for m in linear_module_names(i)]
    q = {m: quantize_rtn(state16[m + ".weight"].float(), 4, 16, symmetric=True) for m in mods}
    fp = {k: v.float() for k, v in state16.items() if k.removesuffix(".weight") not in q}
    src = QuantizedSource(
        "quantized", QuantizedModel(plan.base.config, fp, q), MergedSource("m", plan, "base", "base")
    )
    walk([src], torch.randint(0, 96, (1, 8)), "cpu")
    assert set(src.layer_errors) == set(mods)
    for m in mods:
        w = state16[m + ".weight"].float()
        want = float((dequantize(q[m]) - w).norm() / w.norm())
        assert src.layer_errors[m]["rel_error"] == pytest.approx(want, rel=1e-6), m
        assert 0 < want < 0.5


def test_heads_with_cached_fp32_weights_give_the_same_logits(built):
    """The CUDA path keeps fp32 copies of fp16/bf16 heads (shared between stages); same logits as casting per call."""
    plan = built
    ids = torch.randint(0, 96, (2, 16))
    sources = [
        StoreSource("base", plan.base.config, plan.base.store, key="base"),
        UnmergedSource(plan, "base"),
    ]
    hidden = walk(sources, ids, "cpu")
    sl = StageLogits([Stage(s.name, s) for s in sources], hidden, ids, "cpu")
    before = {s.name: sl.block(Stage(s.name, s), 1) for s in sources}
    assert sl.heads["base"].weight.dtype == torch.float16
    copies: dict = {}
    for h in sl.heads.values():
        h.cache_weights(copies)
    assert len(copies) == 1 and sl.heads["base"].weight.dtype == torch.float32  # one copy, shared
    for s in sources:
        assert torch.equal(sl.block(Stage(s.name, s), 1), before[s.name])


def test_cpu_float32_linear_matches_float64_product():
    """`linear` (oneDNN for float32 on a CPU, where this torch has it) is an IEEE float32 product: within float32
    rounding of the float64 one, rows independent of how many come together; other dtypes are F.linear's. Where
    oneDNN does not give that independence (torch 2.11), `linear` is torch's own product, which claims nothing
    more: with torch 2.11 on an Intel Xeon (session 22), its first 1-5 rows alone differed from the same rows
    among 64 in the last bit."""
    from lorafast_export.validate.layers import _onednn_ok, linear

    g = torch.Generator().manual_seed(0)
    x, w, b = (
        torch.randn(64, 384, generator=g),
        torch.randn(96, 384, generator=g),
        torch.randn(96, generator=g),
    )
    exact = x.double() @ w.double().T + b.double()
    out = linear(x, w, b)
    assert out.dtype == torch.float32 and out.shape == (64, 96)
    assert (out.double() - exact).abs().max() / exact.abs().max() < 1e-5
    if _onednn_ok():
        assert torch.equal(linear(x[:5], w, b), out[:5])
    else:
        assert torch.equal(out, torch.nn.functional.linear(x, w, b))
    assert torch.equal(linear(x.double(), w.double()), torch.nn.functional.linear(x.double(), w.double()))
