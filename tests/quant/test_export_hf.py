"""Quantized HF checkpoints: what is written unpacks (with our own unpackers) to exactly the IR's codes."""

from __future__ import annotations

import importlib.util
import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from lorafast_export.errors import ArtifactLoadError, InputError
from lorafast_export.qform import QScheme, dequantize
from lorafast_export.quant.export_hf import (
    asymmetric_pack_quantized,
    checkpoint_loader_notes,
    write_quantized_checkpoint,
)
from lorafast_export.quant.formats import (
    scheme_from_config_group,
    unpack_awq,
    unpack_compressed_tensors,
    unpack_gptq,
)
from lorafast_export.quant.walk import quantize_checkpoint
from lorafast_export.recipe import Recipe
from lorafast_export.targets.hf.target import HFSession, HFTarget
from lorafast_export.targets.registry import LowerInput
from tests.quant.pipeline_helpers import random_ids, tiny_checkpoint

CALIB = random_ids(8, 16, seed=0)


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("export") / "qwen2", "qwen2")


def export(merged, out, method: str, hf_format: str = "auto", **quant):
    """Quantize and write; the recipe stands in for one (Recipe itself already refuses some combinations)."""
    qm = quantize_checkpoint(merged, {"method": method, **quant}, calib_ids=CALIB)
    recipe = SimpleNamespace(target=SimpleNamespace(hf_format=hf_format))
    facts = write_quantized_checkpoint(LowerInput(merged, qm.config, recipe, qm), out)
    return qm, facts


def unpack(out, qcfg: dict, module: str):
    tensors = {
        k.removeprefix(module + "."): v
        for k, v in load_file(out / "model.safetensors").items()
        if k.startswith(module + ".")
    }
    if qcfg["quant_method"] == "gptq":
        return unpack_gptq(tensors, qcfg["bits"], qcfg["group_size"], qcfg["sym"], qcfg["checkpoint_format"])
    if qcfg["quant_method"] == "awq":
        return unpack_awq(tensors, qcfg["group_size"], qcfg["bits"])
    group = qcfg["config_groups"]["group_0"]
    return unpack_compressed_tensors(tensors, scheme_from_config_group(group), group["format"])


CASES = [  # method, hf_format, quant settings, expected format
    ("gptq", "auto", {"group_size": 32, "act_order": True}, "gptq"),
    ("gptq", "auto", {"group_size": 32, "symmetric": False}, "compressed-tensors"),
    ("awq", "auto", {"group_size": 32}, "compressed-tensors"),
    ("awq", "awq", {"group_size": 32}, "awq"),
    ("awq-gptq", "auto", {"group_size": 32}, "compressed-tensors"),
    ("awq-gptq", "awq", {"group_size": 32}, "awq"),
    ("gptq", "gptq", {"group_size": 32, "symmetric": False}, "gptq"),
    ("rtn", "auto", {"group_size": 32}, "compressed-tensors"),
    ("int8", "auto", {}, "compressed-tensors"),
    ("smoothquant", "auto", {}, "compressed-tensors"),
    ("gptq", "compressed-tensors", {"group_size": 32}, "compressed-tensors"),
    ("rtn", "gptq", {"group_size": 32, "symmetric": True}, "gptq"),
]


@pytest.mark.parametrize(("method", "hf_format", "quant", "fmt"), CASES)
def test_checkpoint_round_trips_to_the_same_codes(merged, tmp_path, method, hf_format, quant, fmt):
    qm, facts = export(merged, tmp_path, method, hf_format, **quant)
    assert facts["format"] == fmt
    config = json.loads((tmp_path / "config.json").read_text())
    qcfg = config["quantization_config"]
    assert qcfg["quant_method"] == fmt and config["model_type"] == "qwen2"
    for name, qt in qm.q.items():
        back = unpack(tmp_path, qcfg, name)
        assert torch.equal(back.codes, qt.codes), name
        assert torch.equal(dequantize(back), dequantize(qt)), name  # AWQ makes symmetric zeros explicit
        assert (back.g_idx is None) == (qt.g_idx is None)
        if qt.bias is not None:  # GPTQ/AWQ store biases in float16
            torch.testing.assert_close(back.bias.float(), qt.bias.float(), atol=1e-3, rtol=1e-3)
    written = load_file(tmp_path / "model.safetensors")
    for k, v in qm.fp.items():  # norms with folded scales come from the QuantizedModel
        assert torch.equal(written[k], v), k
    assert (tmp_path / "tokenizer.json").exists()


@pytest.mark.parametrize(
    ("method", "quant", "hf_format", "message"),
    [
        ("gptq", {"group_size": 32, "act_order": True}, "awq", "act-order"),
        ("rtn", {"group_size": -1}, "awq", "per-channel"),
        ("rtn", {"bits": 8, "group_size": 32}, "awq", "4-bit"),
        ("gptq", {"group_size": 32, "act_order": True}, "compressed-tensors", "act-order"),
        ("int8", {}, "gptq", "float16"),
        ("rtn", {"group_size": 256}, "compressed-tensors", "multiple of group_size"),  # 256 > in_features
    ],
)
def test_impossible_combinations_are_refused(merged, tmp_path, method, quant, hf_format, message):
    with pytest.raises(InputError, match=message):
        export(merged, tmp_path, method, hf_format, **quant)
    assert not (tmp_path / "config.json").exists()


def test_auto_falls_back_to_gptq_for_ragged_groups(merged, tmp_path):
    _, facts = export(merged, tmp_path, "awq", group_size=256)
    assert facts["format"] == "gptq"


def rounded_fake_quant(qm, dtype: str | None):
    """Our fake-quant model of qm, its weights rounded to `dtype` (None: as they are, float32)."""
    from lorafast_export.model.quantized import fake_quant_decoder
    from lorafast_export.qform import QLinear

    ref = fake_quant_decoder(qm)
    if dtype is None:
        return ref
    for name, mod in list(ref.named_modules()):
        if isinstance(mod, QLinear):
            lin = torch.nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None)
            lin.weight = torch.nn.Parameter(
                dequantize(mod.qtensor).to(getattr(torch, dtype)).float(), requires_grad=False
            )
            if mod.bias is not None:
                lin.bias = torch.nn.Parameter(mod.bias.float(), requires_grad=False)
            parent, _, leaf = name.rpartition(".")
            setattr(ref.get_submodule(parent) if parent else ref, leaf, lin)
    return ref


def transformers_and_fake_quant(path, qm):
    """transformers' model of our compressed-tensors checkpoint, as HFSession loads it (compressed; dequantized by
    compressed-tensors where this transformers cannot load it compressed), and our fake-quant model of the same
    codes with the weights rounded as that load rounds them (HFSession.dequantized_to)."""
    session = HFSession(path)
    assert session.model.dtype == torch.float32
    assert session.dequantized_to != "unknown", session.runtime_note
    return session.model, rounded_fake_quant(qm, session.dequantized_to)


@pytest.fixture(scope="module")
def ragged(tmp_path_factory):
    """MLP width 40: at g32 down_proj has a ragged last group of 8 columns (the 30M fixture's 1376 at g128)."""
    return tiny_checkpoint(tmp_path_factory.mktemp("export") / "ragged", "llama", intermediate_size=40)


@pytest.mark.parametrize(
    "method,hf_format,symmetric",
    [("gptq", "compressed-tensors", True), ("awq", "awq", False), ("awq-gptq", "auto", False)],
)
def test_ragged_mlp_is_padded_exactly(ragged, tmp_path, method, hf_format, symmetric):
    """compressed-tensors / AWQ need the group to divide in_features: the MLP width is padded to whole groups with
    weights that dequantize to 0. Read back, the checkpoint holds the quantized stage's codes and scales exactly
    in its first 40 rows / columns, and its logits (a 64-wide MLP) equal the quantized stage's."""
    from lorafast_export.model.quantized import fake_quant_decoder
    from lorafast_export.quant.read_hf import read_quantized_checkpoint

    qm, facts = export(ragged, tmp_path, method, hf_format, group_size=32, symmetric=symmetric)
    assert facts["format"] in ("compressed-tensors", "awq")
    assert facts["intermediate_size_padded"] == {"from": 40, "to": 64}
    assert json.loads((tmp_path / "config.json").read_text())["intermediate_size"] == 64
    back = read_quantized_checkpoint(tmp_path)
    assert back.config.intermediate_size == 64
    for name, qt in qm.q.items():
        w, wb = dequantize(qt), dequantize(back.q[name])
        o, i = qt.codes.shape
        assert torch.equal(back.q[name].codes[:o, :i], qt.codes), name
        assert torch.equal(wb[:o, :i], w), name
        assert not wb[o:].any() and not wb[:, i:].any(), name
        assert wb.shape == (
            (64, i) if name.endswith(("gate_proj", "up_proj")) else (o, 64 if "down" in name else i)
        )
    ids = random_ids(2, 16, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(
            fake_quant_decoder(back)(ids)[0], fake_quant_decoder(qm)(ids)[0], atol=1e-5, rtol=1e-5
        )
    if facts["format"] == "compressed-tensors" and importlib.util.find_spec("compressed_tensors"):
        # transformers' own loader builds the padded model
        model, ref = transformers_and_fake_quant(tmp_path, qm)
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=ids).logits, ref(ids)[0], atol=1e-4, rtol=1e-4)


def test_ragged_layers_other_than_the_mlp_are_still_refused(ragged, tmp_path):
    with pytest.raises(
        InputError, match="multiple of group_size"
    ):  # hidden 64 at g128: every layer is ragged
        export(ragged, tmp_path, "rtn", "compressed-tensors", group_size=128)


def test_w8a8_is_refused_by_weight_only_formats(merged, tmp_path):
    with pytest.raises(InputError, match="weight-only"):
        export(merged, tmp_path, "smoothquant", "gptq")


def test_hf_target_writes_the_quantized_checkpoint(merged, tmp_path):
    recipe = Recipe.from_dict({"quant": {"method": "awq", "group_size": 32}, "target": {"hf_format": "awq"}})
    qm = quantize_checkpoint(merged, recipe.quant, calib_ids=CALIB)
    facts = HFTarget().lower(LowerInput(merged, qm.config, recipe, qm), tmp_path / "model")
    assert facts["format"] == "awq" and (tmp_path / "model" / "config.json").exists()


def test_quantized_lm_head_is_not_ignored(merged, tmp_path):
    qm, _ = export(merged, tmp_path, "rtn", group_size=32, quantize_lm_head=True)
    qcfg = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert qcfg["ignore"] == [] and "lm_head.weight_packed" in load_file(tmp_path / "model.safetensors")
    assert QScheme(4, 32, False) == scheme_from_config_group(qcfg["config_groups"]["group_0"])


@pytest.mark.parametrize(
    "symmetric", [True, False]
)  # gptq's default is asymmetric (zero points) since session 7
def test_transformers_loads_compressed_tensors_and_matches_fake_quant(merged, tmp_path, symmetric):
    pytest.importorskip("compressed_tensors")

    qm, _ = export(merged, tmp_path, "gptq", "compressed-tensors", group_size=32, symmetric=symmetric)
    assert all((qt.zeros is None) is symmetric for qt in qm.q.values())
    if (
        symmetric
    ):  # the signed grid: transformers' compressed-tensors loader gets code 0 (int4 -8), negative scales
        assert all(int(qt.codes.min()) == 0 for qt in qm.q.values())
        assert any(bool((qt.scales < 0).any()) for qt in qm.q.values())
    model, ref = transformers_and_fake_quant(tmp_path, qm)
    ids = random_ids(2, 16, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, ref(ids)[0], atol=1e-4, rtol=1e-4)
    if symmetric:  # every transformers in range loads a symmetric checkpoint compressed
        assert HFSession(tmp_path).dequantized_to is None


def test_hf_session_loads_an_asymmetric_checkpoint_dequantized_where_transformers_cannot_load_it_compressed(
    merged, tmp_path, monkeypatch
):
    """transformers 5.23-5.25 refuse an asymmetric pack-quantized checkpoint (the zero points' size mismatch);
    HFSession loads it with CompressedTensorsConfig(dequantize=True) and says so in its runtime note. The refusal
    is replayed here on any transformers; tests above meet the real one where it is installed."""
    pytest.importorskip("compressed_tensors")
    import transformers

    import lorafast_export.targets.hf.target as hf

    qm, _ = export(merged, tmp_path / "asym", "gptq", "compressed-tensors", group_size=32, symmetric=False)
    export(merged, tmp_path / "sym", "gptq", "compressed-tensors", group_size=32, symmetric=True)
    assert asymmetric_pack_quantized(tmp_path / "asym") and not asymmetric_pack_quantized(tmp_path / "sym")
    real, calls = transformers.AutoModelForCausalLM.from_pretrained, []

    def refuse_compressed(path, **kw):
        calls.append(kw)
        qc = kw.get("quantization_config")
        if qc is None or not qc.dequantize:
            raise RuntimeError("You set `ignore_mismatched_sizes` to `False`, thus raising an error.")
        return real(path, **kw)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse_compressed)
    s = hf.HFSession(tmp_path / "asym")
    assert len(calls) == 2 and calls[1]["quantization_config"].dequantize
    # how compressed-tensors dequantizes there: in float32 under transformers 5.17, in the scales' float16 under 5.25
    assert s.dequantized_to in (None, "float16") and "dequantize=True" in s.runtime_note
    assert (
        transformers.__version__ in s.runtime_note
        and (s.dequantized_to or "exact (float32)") in s.runtime_note
    )
    ids = random_ids(2, 16, seed=5)  # that dequantization of our files: our codes, rounded as measured
    with torch.no_grad():
        torch.testing.assert_close(
            s.logits(ids), rounded_fake_quant(qm, s.dequantized_to)(ids)[0], atol=1e-4, rtol=1e-4
        )
    # the same refusal of a checkpoint without packed zero points is not that issue: a clear error, no retry
    calls.clear()
    with pytest.raises(ArtifactLoadError, match=r"sym: transformers .* refuses this checkpoint"):
        hf.HFSession(tmp_path / "sym")
    assert len(calls) == 1


def test_w8a8_checkpoint_says_how_transformers_rounds_activations(merged, tmp_path, monkeypatch):
    """compressed-tensors cannot express our absmax/127 activation scale: transformers computes absmax/127.5.

    The checkpoint keeps our semantics (vLLM's); the facts say what transformers does, and transformers' logits
    equal our fake-quant model's with that one rounding swapped in."""
    pytest.importorskip("compressed_tensors")
    import transformers

    import lorafast_export.qform as qform
    from lorafast_export.model.quantized import fake_quant_decoder
    from lorafast_export.quant.formats import ct_fake_quant_int8_per_token

    qm, facts = export(merged, tmp_path, "smoothquant", "compressed-tensors")
    assert "absmax/127.5" in " ".join(facts["loader_notes"])
    assert checkpoint_loader_notes(tmp_path) == facts["loader_notes"]
    from lorafast_export.targets.hf.target import HFSession

    assert HFSession(tmp_path).runtime_note == " ".join(facts["loader_notes"])  # reaches the report's note
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = random_ids(2, 16, seed=3)
    with torch.no_grad():
        theirs, ours = model(input_ids=ids).logits, fake_quant_decoder(qm)(ids)[0]
        monkeypatch.setattr(qform, "fake_quant_int8_per_token", ct_fake_quant_int8_per_token)
        ours_ct_rounding = fake_quant_decoder(qm)(ids)[0]
    torch.testing.assert_close(theirs, ours_ct_rounding, atol=1e-4, rtol=1e-4)
    assert (theirs - ours).abs().max() > 1e-3  # the difference the note describes is real


def test_weight_only_checkpoints_have_no_loader_notes(merged, tmp_path):
    _, facts = export(merged, tmp_path, "rtn", "compressed-tensors", group_size=32)
    assert "loader_notes" not in facts and checkpoint_loader_notes(tmp_path) == []
    assert checkpoint_loader_notes(merged) == []  # not quantized at all


@pytest.mark.parametrize(
    "fmt,quant",
    [
        ("gptq", {"group_size": 32, "act_order": True}),
        ("awq", {"group_size": 32}),
        ("compressed-tensors", {"group_size": 32}),
    ],
)
def test_reader_session_reproduces_the_fake_quant_model(merged, tmp_path, fmt, quant):
    """Without GPTQModel, hf artifacts are validated by reading the written files back: same logits as fake-quant."""
    from lorafast_export.model.quantized import fake_quant_decoder
    from lorafast_export.targets.hf.target import QuantizedReaderSession

    method = "gptq" if fmt != "awq" else "awq"
    qm, _ = export(merged, tmp_path / "model", method, fmt, **quant)
    ids = CALIB[:2]
    with torch.no_grad():
        ref = fake_quant_decoder(qm)(ids)[0]
    got = QuantizedReaderSession(tmp_path / "model").logits(ids)
    # codes are bit-exact (tested above); GPTQ/AWQ checkpoints store the fp tensors in fp16 (their kernels' dtype)
    assert (got - ref).abs().max() < (1e-4 if fmt == "compressed-tensors" else 2e-3)
