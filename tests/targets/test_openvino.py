"""Target openvino: lowering error, the IR's promised ops, compressed codes, both openvino-genai pipelines."""

from __future__ import annotations

import string
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("openvino")
pytest.importorskip("openvino_genai")
pytest.importorskip("openvino_tokenizers")

import openvino as ov  # noqa: E402

from lorafast_export.errors import InputError, UnsupportedError  # noqa: E402
from lorafast_export.model.decoder import Decoder, load_decoder  # noqa: E402
from lorafast_export.model.quantized import QuantizedModel, fake_quant_decoder  # noqa: E402
from lorafast_export.model.spec import linear_module_names  # noqa: E402
from lorafast_export.qform import QTensor, act_order_perm  # noqa: E402
from lorafast_export.quant.rtn import group_minmax, qparams, quantize_codes, quantize_rtn  # noqa: E402
from lorafast_export.targets.openvino.compress import read_compressed  # noqa: E402
from lorafast_export.targets.openvino.lower import MODEL_XML  # noqa: E402
from lorafast_export.targets.registry import LowerInput, get_target  # noqa: E402
from lorafast_export.weights import open_model  # noqa: E402
from tests.tiny import make_model, save_model  # noqa: E402

LLAMA3 = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}
PROMPTS = [[5, 17, 33, 2, 60, 44, 12], [3, 4, 5], [90, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]]
NEW_TOKENS = 12


def save_tokenizer(path: Path, vocab_size: int) -> None:
    """A character-level BPE tokenizer (no merges) of exactly vocab_size tokens, as openvino-tokenizers needs one."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = list(string.ascii_letters + string.digits + string.punctuation)
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", *chars[: vocab_size - 3]])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    ).save_pretrained(path)


def recipe(**options):
    return SimpleNamespace(target=SimpleNamespace(name="openvino", dtype="auto", options=options))


def tiny_checkpoint(path: Path, family: str, **kw) -> Path:
    save_model(make_model(family, **kw), path)
    save_tokenizer(path, 96)
    return path


@torch.no_grad()
def greedy(dec: Decoder, ids: list[int], n: int) -> list[int]:
    logits, past = dec(torch.tensor([ids]))
    out = []
    for _ in range(n):
        out.append(int(logits[0, -1].argmax()))
        pos = torch.tensor([[len(ids) + len(out) - 1]])
        logits, past = dec(torch.tensor([[out[-1]]]), past, pos)
    return out


def lower(tmp: Path, merged: Path, quantized=None) -> Path:
    target = get_target("openvino")
    cfg = open_model(merged).config
    facts = target.lower(LowerInput(merged, cfg, recipe(), quantized), tmp / "model")
    assert facts["ops"]["ScaledDotProductAttention"] == cfg.num_layers
    assert facts["ops"]["ReadValue"] == facts["ops"]["Assign"] == 2 * cfg.num_layers
    return tmp / "model"


def check_ir(model_dir: Path, n_layers: int) -> ov.Model:
    om = ov.Core().read_model(model_dir / MODEL_XML)
    types = [n.get_type_name() for n in om.get_ops()]
    assert types.count("ScaledDotProductAttention") == n_layers
    assert types.count("ReadValue") == types.count("Assign") == 2 * n_layers
    assert {p.get_any_name() for p in om.inputs} == {
        "input_ids",
        "attention_mask",
        "position_ids",
        "beam_idx",
    }
    assert [p.get_any_name() for p in om.outputs] == ["logits"]
    for name in ("openvino_tokenizer.xml", "openvino_detokenizer.xml", "config.json", "tokenizer.json"):
        assert (model_dir / name).exists(), name
    return om


def check_generation(model_dir: Path, ref: Decoder) -> None:
    session = get_target("openvino").load(model_dir)
    want = [greedy(ref, p, NEW_TOKENS) for p in PROMPTS]
    assert [session.generate(p, NEW_TOKENS) for p in PROMPTS[:2]] == want[:2]  # LLMPipeline, stateful SDPA
    assert session.generate_batch(PROMPTS, NEW_TOKENS) == want  # ContinuousBatchingPipeline, paged attention


def kl_mean(got: torch.Tensor, want: torch.Tensor) -> float:
    """Mean per-token KL(want || got) of next-token distributions."""
    p, q = want.double().log_softmax(-1), got.double().log_softmax(-1)
    return (p.exp() * (p - q)).sum(-1).mean().item()


def max_abs_logits(model_dir: Path, ref: Decoder, seq: int = 24) -> tuple[float, float]:
    """(max-abs logits difference, mean KL) of the f32 session against `ref` on random tokens."""
    ids = torch.randint(0, 96, (2, seq), generator=torch.Generator().manual_seed(1))
    got = get_target("openvino").load(model_dir).logits(ids)
    with torch.no_grad():
        want, _ = ref(ids)
    assert got.shape == want.shape
    return (got - want).abs().max().item(), kl_mean(got, want)


# ------------------------------------------------------------------------------------------------- fp32

FP_CASES = [
    ("llama", {}),
    ("llama", {"tie": True, "rope": LLAMA3}),
    ("qwen2", {}),
    ("mistral", {"sliding_window": 8}),  # shorter than the test sequences: the window matters
]


@pytest.mark.parametrize("family,kw", FP_CASES, ids=["llama", "llama-tied-llama3", "qwen2-bias", "mistral"])
def test_fp32_lowering_matches_decoder(tmp_path, family, kw):
    merged = tiny_checkpoint(tmp_path / "merged", family, **kw)
    model_dir = lower(tmp_path, merged)
    ref = load_decoder(open_model(merged))
    check_ir(model_dir, ref.cfg.num_layers)
    check_runtime_graph(model_dir, ref.cfg.num_layers)
    assert max_abs_logits(model_dir, ref)[0] < 1e-4
    if family in ("llama", "qwen2") and not kw:
        check_generation(model_dir, ref)
    if (
        family == "mistral"
    ):  # the stateful SDPA path applies the window (paged attention does not: module doc)
        long_prompt = PROMPTS[2] + PROMPTS[0]
        session = get_target("openvino").load(model_dir)
        assert session.generate(long_prompt, 16) == greedy(ref, long_prompt, 16)
    if family == "llama" and not kw:
        check_paged_attention_rewrite(model_dir, ref.cfg.num_layers)
        check_default_precision(model_dir, ref)


def check_paged_attention_rewrite(model_dir: Path, n_layers: int) -> None:
    """What ContinuousBatchingPipeline does to the IR: every SDPA becomes a PagedAttentionExtension."""
    from openvino._offline_transformations import paged_attention_transformation

    om = ov.Core().read_model(model_dir / MODEL_XML)
    paged_attention_transformation(om)
    types = [n.get_type_name() for n in om.get_ops()]
    assert types.count("PagedAttentionExtension") == n_layers
    assert "ScaledDotProductAttention" not in types


def check_default_precision(model_dir: Path, ref: Decoder) -> None:
    ids = torch.randint(0, 96, (1, 16), generator=torch.Generator().manual_seed(2))
    got = get_target("openvino").load(model_dir, precision="default").logits(ids)
    with torch.no_grad():
        want, _ = ref(ids)
    assert (
        torch.isfinite(got).all() and kl_mean(got, want) < 0.05
    )  # bf16 + u8 KV: close, not float-rounding close


# -------------------------------------------------------------------------------------------- quantized


def act_order_qtensor(
    w: torch.Tensor, bits: int, group_size: int, symmetric: bool, seed: int, bias: torch.Tensor | None = None
) -> QTensor:
    """RTN with GPTQ-style act-order groups: column c is in group rank(c) // group_size under a random order."""
    perm = torch.randperm(w.shape[1], generator=torch.Generator().manual_seed(seed))
    g_idx = (torch.argsort(perm) // group_size).to(torch.int32)
    n_groups = -(-w.shape[1] // group_size)
    scale, zero = qparams(*group_minmax(w.float(), g_idx.long(), n_groups), bits, symmetric)
    g = g_idx.long()
    codes = quantize_codes(w, scale[:, g], None if zero is None else zero[:, g], bits)
    return QTensor(
        codes=codes, scales=scale, zeros=zero, bits=bits, group_size=group_size, g_idx=g_idx, bias=bias
    )


def quantize_all(merged: Path, bits: int, group_size: int, symmetric: bool, act_order=False, act_quant=None):
    md = open_model(merged)
    fp = {k: md.store.get(k) for k in md.store.keys()}
    q = {}
    for i in range(md.config.num_layers):
        for j, m in enumerate(linear_module_names(i)):
            w, bias = (
                fp.pop(f"{m}.weight"),
                fp.pop(f"{m}.bias", None),
            )  # a quantized linear's bias is in its QTensor
            qt = (
                act_order_qtensor(w, bits, group_size, symmetric, seed=10 * i + j, bias=bias)
                if act_order
                else quantize_rtn(w, bits, group_size, symmetric, bias=bias)
            )
            q[m] = QTensor(**{**qt.__dict__, "act_quant": act_quant}) if act_quant else qt
    return QuantizedModel(md.config, fp, q, {"method": "rtn", "bits": bits, "group_size": group_size})


Q_CASES = [
    (
        "int4-asym-g32-ragged",
        "llama",
        dict(bits=4, group_size=32, symmetric=False),
    ),  # down_proj: 48 = 32 + 16
    ("int4-sym-g16-actorder-qwen2", "qwen2", dict(bits=4, group_size=16, symmetric=True, act_order=True)),
    ("int4-sym-g32-ragged", "llama", dict(bits=4, group_size=32, symmetric=True)),  # down_proj: 48 = 32 + 16
    ("int8-sym-channel", "llama", dict(bits=8, group_size=-1, symmetric=True)),
    (
        "int8-asym-channel-w8a8",
        "llama",
        dict(bits=8, group_size=-1, symmetric=False, act_quant="int8_per_token_dynamic"),
    ),
]


@pytest.mark.parametrize("family,qkw", [c[1:] for c in Q_CASES], ids=[c[0] for c in Q_CASES])
def test_quantized_lowering(tmp_path, family, qkw):
    merged = tiny_checkpoint(tmp_path / "merged", family)
    qm = quantize_all(merged, **qkw)
    model_dir = lower(tmp_path, merged, qm)
    ref = fake_quant_decoder(qm)  # the fake-quant reference
    if qkw[
        "symmetric"
    ]:  # the signed grid reaches the runtime: every layer holds code 0 (signed -2**(bits-1))
        # and the model holds negative scales
        assert all(int(qt.codes.min()) == 0 for qt in qm.q.values())
        assert any(bool((qt.scales < 0).any()) for qt in qm.q.values())
    om = check_ir(model_dir, ref.cfg.num_layers)
    for path, qt in qm.q.items():
        check_codes(om, path, qt)
    check_runtime_graph(model_dir, ref.cfg.num_layers, qt.bits)
    max_abs, kl = max_abs_logits(model_dir, ref)
    if qt.act_quant is None:
        assert max_abs < 1e-4
    else:  # int8 activation rounding is a step: float-rounding differences upstream flip a few codes
        assert kl < 1e-4
    check_generation(model_dir, ref)


def check_codes(om: ov.Model, path: str, qt: QTensor) -> None:
    """The IR holds the QTensor's codes, zero points and scales bit for bit (columns sorted by group)."""
    got = read_compressed(om, path)
    perm = act_order_perm(qt) if qt.g_idx is not None else torch.arange(qt.in_features)
    codes = got["codes"].reshape(qt.out_features, -1)[:, : qt.in_features].astype(np.int16)
    if qt.zeros is None:
        assert got["codes"].dtype == np.int8  # i4 / i8: codes - 2**(bits-1)
        codes = codes + 2 ** (qt.bits - 1)
    else:
        assert np.array_equal(got["zero_point"].reshape(qt.zeros.shape), qt.zeros.numpy())
    assert np.array_equal(codes, qt.codes[:, perm].numpy())
    assert np.array_equal(got["scale"].reshape(qt.scales.shape), qt.scales.numpy())


def check_runtime_graph(model_dir: Path, n_layers: int, bits: int | None = None) -> None:
    """What the CPU plugin makes of the IR: fused RoPE (q and k of each layer), SDPA, and with `bits` every
    quantized linear as a FullyConnected on the low-bit constants (no f32 weight copy; lm_head stays f32)."""
    compiled = ov.Core().compile_model(model_dir / MODEL_XML, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    ops = [(n, n.get_rt_info()["layerType"].astype(str)) for n in compiled.get_runtime_model().get_ops()]
    kinds = [k for _, k in ops]
    assert kinds.count("RoPE") == 2 * n_layers
    assert kinds.count("ScaledDotProductAttention") == n_layers
    if bits is not None:
        low = [
            n
            for n, k in ops
            if k == "FullyConnected"
            and any(
                i.get_element_type().is_integral() and i.get_element_type().bitwidth == bits
                for i in n.inputs()
            )
        ]
        assert len(low) == 7 * n_layers


# ----------------------------------------------------------------------------------------------- inputs


def test_available_and_registered():
    target = get_target("openvino")
    assert target.available()[0]
    assert "lorafast-export[openvino]" in target.install_hint


def test_bad_options_and_inputs_fail_fast(tmp_path):
    merged = tiny_checkpoint(tmp_path / "merged", "llama")
    cfg = open_model(merged).config
    target = get_target("openvino")
    with pytest.raises(InputError, match="unknown key.*bogus"):
        target.lower(LowerInput(merged, cfg, recipe(bogus=1)), tmp_path / "a")
    bad_dtype = SimpleNamespace(target=SimpleNamespace(name="openvino", dtype="float16", options={}))
    with pytest.raises(UnsupportedError, match="dtype"):
        target.lower(LowerInput(merged, cfg, bad_dtype), tmp_path / "b")
    (merged / "tokenizer.json").unlink()
    with pytest.raises(InputError, match="tokenizer"):
        target.lower(LowerInput(merged, cfg, recipe()), tmp_path / "c")
    with pytest.raises(InputError, match="precision"):
        target.load(tmp_path / "c", precision="bf17")
