"""Target onnxruntime: logits vs the canonical decoder / fake-quant reference, op inventory, exact MatMulNBits
initializers, KV-cache path in plain onnxruntime, greedy tokens from onnxruntime-genai."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxruntime_genai")
onnx = pytest.importorskip("onnx")

from onnx import numpy_helper  # noqa: E402

from lorafast_export.errors import InputError, UnsupportedError  # noqa: E402
from lorafast_export.model.decoder import Decoder, load_decoder  # noqa: E402
from lorafast_export.model.quantized import QuantizedModel  # noqa: E402
from lorafast_export.model.spec import linear_module_names  # noqa: E402
from lorafast_export.qform import QLinear, QTensor, with_fields, zero_points  # noqa: E402
from lorafast_export.quant.rtn import quantize_rtn  # noqa: E402
from lorafast_export.quant.smoothquant import quantize_w8a8  # noqa: E402
from lorafast_export.quant.walk import quantize_checkpoint  # noqa: E402
from lorafast_export.recipe import Recipe  # noqa: E402
from lorafast_export.targets.onnxruntime.nbits import unpack_codes, unpack_zero_points  # noqa: E402
from lorafast_export.targets.onnxruntime.target import OrtSession  # noqa: E402
from lorafast_export.targets.registry import LowerInput, get_target  # noqa: E402
from lorafast_export.weights import open_model  # noqa: E402
from tests.tiny import hf_logits, make_model, save_model  # noqa: E402

SIZE = {"hidden": 64, "intermediate_size": 96}  # head_dim 16: GroupQueryAttention needs a multiple of 16
LLAMA3 = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}
FP_CASES = [
    ("llama", {}),
    ("llama", {"tie": True, "rope": LLAMA3}),
    ("llama", {"rope": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}}),
    ("qwen2", {}),
    ("mistral", {"sliding_window": 8}),
]


def recipe(**target) -> Recipe:
    return Recipe().with_overrides(
        {"target.name": "onnxruntime", **{f"target.{k}": v for k, v in target.items()}}
    )


def lower(tmp_path, merged, quantized=None, **target):
    md = open_model(merged)
    t = get_target("onnxruntime")
    facts = t.lower(LowerInput(merged, md.config, recipe(**target), quantized), tmp_path / "model")
    return facts, OrtSession(tmp_path / "model", threads=1)  # = t.load(); one thread suits toy models


def greedy(dec: Decoder, prompt: list[int], n: int) -> list[int]:
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(dec(torch.tensor([seq]))[0][0, -1].argmax()))
    return seq[len(prompt) :]


def kl(ref: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """KL(ref ‖ out) per token, in float64."""
    return F.kl_div(
        out.double().log_softmax(-1), ref.double().log_softmax(-1), log_target=True, reduction="none"
    ).sum(-1)


def graph_ops(model_dir) -> dict[str, int]:
    m = onnx.load(str(model_dir / "model.onnx"), load_external_data=False)
    ops: dict[str, int] = {}
    for n in m.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    return ops


@pytest.mark.parametrize("family,kw", FP_CASES, ids=[f"{f}-{'-'.join(k) or 'plain'}" for f, k in FP_CASES])
def test_fp_logits_match_decoder_and_kv_cache(tmp_path, family, kw):
    hf = make_model(family, **SIZE, **kw)
    merged = save_model(hf, tmp_path / "merged")
    facts, sess = lower(tmp_path, merged)
    ids = torch.randint(0, 96, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = load_decoder(open_model(merged))(ids)[0]
    out = sess.logits(ids)
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert (out - ref).abs().max().item() < 1e-4
    assert (out - hf_logits(hf, ids)).abs().max().item() < 1e-4
    # explicit KV cache in plain onnxruntime: prefill 25, then decode one token at a time
    past = sess.empty_past(2)
    steps = [sess.step(ids[:, :25], past)]
    for t in range(25, 40):
        steps.append(sess.step(ids[:, t : t + 1], steps[-1][1]))
    assert (torch.cat([s[0] for s in steps], 1) - out).abs().max().item() < 1e-4
    assert steps[-1][1]["past_key_values.0.key"].shape == (2, 2, 40, 16)
    # batch 1: a multi-token chunk after a cached prefix (GroupQueryAttention allows it only at batch 1)
    l1, past = sess.step(ids[:1, :25], sess.empty_past(1))
    l2, _ = sess.step(ids[:1, 25:], past)
    assert (torch.cat([l1, l2], 1) - out[:1]).abs().max().item() < 1e-4
    # op inventory: fused attention and norms, one MatMul per linear (+ lm_head), no Softmax chain
    ops = graph_ops(tmp_path / "model")
    assert ops == facts["ops"]
    assert ops["GroupQueryAttention"] == 2 and "Softmax" not in ops
    assert ops["MatMul"] == 2 * 5 + 1  # q/k/v fused, o, gate, up, down per layer; lm_head
    assert ops["SimplifiedLayerNormalization"] == 1 and ops["SkipSimplifiedLayerNormalization"] == 2 * 2


def test_fp_greedy_onnxruntime_genai(tmp_path):
    merged = save_model(make_model("llama", **SIZE), tmp_path / "merged")
    lower(tmp_path, merged)
    sess = get_target("onnxruntime").load(tmp_path / "model")  # what validate uses: default threads
    assert isinstance(sess, OrtSession)
    cfg = json.loads((tmp_path / "model" / "genai_config.json").read_text())
    assert cfg["model"]["decoder"]["filename"] == "model.onnx" and cfg["search"]["past_present_share_buffer"]
    assert (tmp_path / "model" / "config.json").exists()
    prompt = [5, 17, 3, 88, 42, 7]
    assert sess.generate(prompt, 16) == greedy(load_decoder(open_model(merged)), prompt, 16)
    with pytest.raises(InputError, match="max_length=256"):
        sess.generate([1] * 250, 10)


def test_float16_artifact_runs(tmp_path):
    merged = save_model(make_model("qwen2", **SIZE), tmp_path / "merged")
    facts, sess = lower(tmp_path, merged, dtype="float16")
    ids = torch.randint(0, 96, (1, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = load_decoder(open_model(merged))(ids)[0]
    assert facts["dtype"] == "float16" and sess.kv_dtype == np.float16
    assert (sess.logits(ids) - ref).abs().max().item() < 0.1  # fp16 rounding, not lowering error


# ------------------------------------------------------------------------------------------ quantized


def quantize(merged, method: str) -> QuantizedModel:
    """QuantizedModel made with quantize_rtn (what quant/ makes, without calibration)."""
    md = open_model(merged)
    state = {k: md.store.get(k) for k in md.store.keys()}
    g = torch.Generator().manual_seed(0)
    q: dict[str, QTensor] = {}
    perms: dict[str, torch.Tensor] = {}
    for i in range(md.config.num_layers):
        for m in linear_module_names(i):
            w, b = state[f"{m}.weight"], state.get(f"{m}.bias")
            if method == "act_order":  # GPTQ-style g_idx: groups of 16 in a permuted column order,
                # one order per input (GPTQ sorts by the input's Hessian, shared by q/k/v and by gate/up)
                key = (
                    m.replace("k_proj", "q_proj").replace("v_proj", "q_proj").replace("up_proj", "gate_proj")
                )
                perm = perms.setdefault(key, torch.randperm(w.shape[1], generator=g))
                qt = quantize_rtn(w[:, perm], 4, 16, symmetric=False, bias=b)
                inv = torch.argsort(perm)
                q[m] = with_fields(qt, codes=qt.codes[:, inv].contiguous(), g_idx=(inv // 16).to(torch.int32))
            elif method == "w8a8":
                q[m] = quantize_w8a8(w, bias=b)
            else:
                bits, group, sym = {
                    "int4_g32_asym": (4, 32, False),
                    "int4_g64_sym": (4, 64, True),
                    "int4_channel": (4, -1, False),
                    "int8_channel": (8, -1, True),
                }[method]
                q[m] = quantize_rtn(w, bits, group, symmetric=sym, bias=b)
    fp = {k: v for k, v in state.items() if not any(k.startswith(m + ".") for m in q)}
    # a folded AWQ/SmoothQuant scale makes the norms differ from the checkpoint: the target must read .fp
    fp["model.layers.0.input_layernorm.weight"] = fp["model.layers.0.input_layernorm.weight"] * 1.5
    return QuantizedModel(md.config, fp, q, {"method": method})


def fake_quant_decoder(qm: QuantizedModel) -> Decoder:
    from lorafast_export.model.decoder import build_decoder

    state = dict(qm.fp)
    for m, qt in qm.q.items():  # placeholders so the strict load passes; replaced by QLinear below
        state[f"{m}.weight"] = torch.zeros(qt.out_features, qt.in_features)
        if qt.bias is not None:
            state[f"{m}.bias"] = qt.bias
    dec = build_decoder(qm.config, state)
    for i, layer in enumerate(dec.model.layers):
        for rel in layer.linears():
            parent, name = rel.split(".")
            setattr(getattr(layer, parent), name, QLinear(qm.q[f"model.layers.{i}.{rel}"]))
    return dec


QUANT_CASES = [
    ("int4_g32_asym", True),
    ("int4_g32_asym", False),
    ("int4_g64_sym", True),
    ("int4_channel", True),
    ("int8_channel", True),
    ("act_order", True),
    ("act_order", False),
    ("w8a8", True),
    ("w8a8", False),
]


@pytest.mark.parametrize(
    "method,fuse", QUANT_CASES, ids=[f"{m}-{'fused' if f else 'unfused'}" for m, f in QUANT_CASES]
)
def test_quantized_matches_fake_quant(tmp_path, method, fuse):
    merged = save_model(make_model("qwen2", **SIZE), tmp_path / "merged")
    qm = quantize(merged, method)
    facts, sess = lower(tmp_path, merged, qm, options={"fuse_qkv": fuse})
    dec = fake_quant_decoder(qm)
    ids = torch.randint(0, 96, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = dec(ids)[0]
    out = sess.logits(ids)
    if method in ("int4_g64_sym", "int8_channel", "w8a8"):  # the signed grid reaches the runtime: every layer
        # holds code 0 (signed -2**(bits-1)) and the model holds negative scales
        assert all(int(qt.codes.min()) == 0 for qt in qm.q.values())
        assert any(bool((qt.scales < 0).any()) for qt in qm.q.values())
    if method == "w8a8":
        # exact integer matmul, but the per-token activation rounding is discontinuous: a 1-ulp difference
        # in a norm output (onnxruntime's vs torch's RMSNorm) can move round(x / s) by one code
        assert kl(ref, out).mean().item() < 1e-4
        assert (out.argmax(-1) == ref.argmax(-1)).float().mean().item() > 0.97
    else:
        assert (out - ref).abs().max().item() < 1e-4
        assert kl(ref, out).max().item() < 1e-8
    ops = graph_ops(tmp_path / "model")
    op = "MatMulInteger" if method == "w8a8" else "MatMulNBits"
    # one low-bit op per quantized linear; fused: q/k/v share one (their rows concatenated)
    assert len(qm.q) == 14 and ops[op] == (10 if fuse else 14)
    assert ops["MatMul"] == 1 and ops["GroupQueryAttention"] == 2  # only the fp lm_head stays MatMul
    prompt = [3, 61, 9, 27, 80]
    assert sess.generate(prompt, 12) == greedy(dec, prompt, 12)


@pytest.mark.parametrize(
    "method", ["int4_g32_asym", "int4_g64_sym", "int4_channel", "int8_channel", "act_order"]
)
def test_matmulnbits_initializers_are_the_qtensor(tmp_path, method):
    merged = save_model(make_model("llama", **SIZE, layers=1), tmp_path / "merged")
    qm = quantize(merged, method)
    lower(tmp_path, merged, qm)
    m = onnx.load(str(tmp_path / "model" / "model.onnx"))
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    nodes = [n for n in m.graph.node if n.op_type == "MatMulNBits"]
    producers = {o: n for n in m.graph.node for o in n.output}
    assert len(nodes) == 5  # q/k/v fused into one
    qkv = [qm.q[f"model.layers.0.self_attn.{p}"] for p in ("q_proj", "k_proj", "v_proj")]
    expected = {
        **qm.q,
        "model.layers.0.self_attn.qkv_proj": with_fields(  # rows of q, k, v one after the other
            qkv[0],
            codes=torch.cat([q.codes for q in qkv]),
            scales=torch.cat([q.scales for q in qkv]),
            zeros=None if qkv[0].zeros is None else torch.cat([q.zeros for q in qkv]),
            bias=None,
        ),
    }
    for node in nodes:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        module = node.input[1].removesuffix(".qweight")
        qt = expected[module]
        producer = producers.get(node.input[0])
        perm = inits[producer.input[1]] if producer is not None and producer.op_type == "Gather" else None
        assert (perm is not None) == (method == "act_order")  # activation columns gathered in B's order
        assert attrs["bits"] == qt.bits and attrs["K"] == qt.in_features and attrs["N"] == qt.out_features
        codes = unpack_codes(inits[node.input[1]], qt.bits, qt.in_features, perm)
        assert np.array_equal(codes, qt.codes.numpy())
        # every block repeats its group's scale / zero: read one block per group back
        block, k_blocks = attrs["block_size"], inits[node.input[2]].shape[1]
        padding = unpack_codes(inits[node.input[1]], qt.bits, k_blocks * block)[:, qt.in_features :]
        last_zero = zero_points(qt)[:, -1 if perm is None else int(qt.g_idx[perm[-1]])].numpy()
        assert np.array_equal(padding, np.repeat(last_zero[:, None], padding.shape[1], 1))  # dequantizes to 0
        col = np.arange(k_blocks) * block  # first (sorted) column of each block
        group = (
            qt.g_idx[torch.from_numpy(perm[col])].long()
            if perm is not None
            else (
                torch.zeros(k_blocks, dtype=torch.long)
                if qt.group_size == -1
                else torch.from_numpy(col) // qt.group_size
            )
        )
        scales = torch.from_numpy(inits[node.input[2]].copy())
        assert torch.equal(scales, qt.scales[:, group].float())  # fp16 scales → fp32 exactly
        first = np.unique(group.numpy(), return_index=True)[1]
        assert torch.equal(scales[:, first], qt.scales.float())  # every group is present
        if qt.zeros is None:
            assert len(node.input) == 3  # MatMulNBits' default zero point 2**(bits-1) = qform symmetric
        else:
            zp = unpack_zero_points(inits[node.input[3]], qt.bits, k_blocks)
            assert np.array_equal(zp, qt.zeros[:, group].numpy())


def test_w8a8_weights_are_the_codes(tmp_path):
    merged = save_model(make_model("llama", **SIZE, layers=1), tmp_path / "merged")
    qm = quantize(merged, "w8a8")
    lower(tmp_path / "unfused", merged, qm, options={"fuse_qkv": False})
    m = onnx.load(str(tmp_path / "unfused" / "model" / "model.onnx"))
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    for module, qt in qm.q.items():
        assert np.array_equal(inits[f"{module}.qweight"].T, qt.codes.numpy())
        assert np.array_equal(inits[f"{module}.scales"], qt.scales[:, 0].float().numpy())


# -------------------------------------------------------------------------------------------- errors


def test_options_are_checked(tmp_path):
    """Refused when the recipe is read (before any work), and again by lower() for a recipe made another way."""
    with pytest.raises(InputError) as e:
        recipe(options={"threads": 1, "accuracy_level": 9})
    assert "target.options: unknown option 'threads'" in str(e.value) and "accuracy_level=9" in str(e.value)
    with pytest.raises(InputError, match="bfloat16"):
        recipe(dtype="bfloat16")
    merged = save_model(make_model("llama", **SIZE, layers=1), tmp_path / "merged")
    md, good = open_model(merged), recipe()
    for target in ({"options": {"threads": 1, "accuracy_level": 9}}, {"dtype": "bfloat16"}):
        unchecked = good.model_copy(update={"target": good.target.model_copy(update=target)})  # not validated
        with pytest.raises(InputError, match="threads.*accuracy_level=9|bfloat16"):
            get_target("onnxruntime").lower(LowerInput(merged, md.config, unchecked), tmp_path / "model")


@pytest.mark.parametrize("group_size", [-1, 8, 16, 32, 64, 128, 256])
def test_recipe_group_size_rule_agrees_with_matmulnbits(group_size):
    """The declared rule refuses exactly the group sizes ort/nbits.py cannot lay out as MatMulNBits blocks."""
    from types import SimpleNamespace

    from lorafast_export.targets.onnxruntime.nbits import block_size_for

    try:
        block_size_for(SimpleNamespace(group_size=group_size, in_features=512), "w")
        lowers = True
    except UnsupportedError:
        lowers = False
    try:
        Recipe().with_overrides(
            {"target.name": "onnxruntime", "quant.method": "rtn", "quant.group_size": group_size}
        )
        accepted = True
    except InputError as e:
        assert "quant.group_size" in str(e) and "multiple of 16" in str(e)
        accepted = False
    assert accepted == lowers


def test_load_refuses_a_decoder_file_outside_the_artifact(tmp_path):
    """A tampered genai_config.json would make onnxruntime-genai open any file: refused before it does."""
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "genai_config.json").write_text(
        json.dumps({"model": {"decoder": {"filename": "/etc/passwd"}}})
    )
    with pytest.raises(InputError, match="model.decoder.filename = '/etc/passwd' is absolute"):
        get_target("onnxruntime").load(tmp_path / "model")


def test_unsupported_shapes_are_refused(tmp_path):
    merged = save_model(make_model("llama", hidden=32, layers=1), tmp_path / "m8")  # head_dim 8
    with pytest.raises(UnsupportedError, match="multiple of 16"):
        lower(tmp_path, merged)
    merged = save_model(make_model("llama", **SIZE, layers=1), tmp_path / "merged")
    qm = quantize(merged, "int4_g32_asym")
    w = open_model(merged).store.get("model.layers.0.mlp.down_proj.weight")
    qm.q["model.layers.0.mlp.down_proj"] = quantize_rtn(w, 4, 24, symmetric=False)  # 24: no power-of-2 block
    with pytest.raises(UnsupportedError, match="group_size=24"):
        lower(tmp_path, merged, qm)


def test_available():
    ok, hint = get_target("onnxruntime").available()
    assert ok and "lorafast-export[onnxruntime]" in hint


@pytest.mark.parametrize(
    "opts",
    [
        {"method": "gptq", "group_size": 16, "act_order": True},
        {"method": "awq", "group_size": 32, "awq_grid": 2, "awq_clip": False},
        {"method": "awq-gptq", "group_size": 32, "awq_grid": 2},
    ],
    ids=["gptq-act_order", "awq", "awq-gptq"],
)
def test_quantize_checkpoint_lowers(tmp_path, opts):
    """The quantizers' own QuantizedModel (folded AWQ norms, GPTQ g_idx shared by q/k/v) lowers exactly."""
    merged = save_model(make_model("llama", **SIZE, layers=1), tmp_path / "merged")
    calib = torch.randint(0, 96, (4, 32), generator=torch.Generator().manual_seed(0))
    qm = quantize_checkpoint(merged, {**opts, "device": "cpu"}, calib_ids=calib)
    facts, sess = lower(tmp_path, merged, qm)
    ids = torch.randint(0, 96, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = fake_quant_decoder(qm)(ids)[0]
    assert (sess.logits(ids) - ref).abs().max().item() < 1e-4
    assert facts["ops"]["MatMulNBits"] == 5  # q/k/v fused
    assert facts["act_order_gathers"] == (4 if opts.get("act_order") else 0)  # gate/up share one
