"""torch-compile target: lower() writes model/, load() runs it; fp and quantized; options are checked."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lorafast_export.errors import InputError
from lorafast_export.model.decoder import load_decoder
from lorafast_export.model.quantized import QuantizedModel
from lorafast_export.qform import ACT_QUANT_INT8_PER_TOKEN, with_fields
from lorafast_export.runtime import api
from lorafast_export.runtime.artifact import read_meta
from lorafast_export.targets.registry import LowerInput, get_target
from tests.runtime.helpers import fake_quant_decoder, greedy_reference, quantize_all, tiny_checkpoint
from tests.tiny import hf_logits, make_model, save_model


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def lower(md, out: Path, quantized=None, dtype="auto", **options) -> Path:
    recipe = SimpleNamespace(target=SimpleNamespace(dtype=dtype, options=options))
    facts = get_target("torch-compile").lower(LowerInput(md.path, md.config, recipe, quantized), out)
    assert facts["format"] == "lorafast-torch-runtime"
    return out


def test_fp_round_trip_matches_transformers(tmp_path):
    hf = make_model("qwen2", tie=True)
    from lorafast_export.weights import open_model

    md = open_model(save_model(hf, tmp_path / "merged"))
    out = lower(md, tmp_path / "model", max_seq_len=64)
    assert (out / "config.json").exists() and (out / "runtime.json").exists()
    session = get_target("torch-compile").load(out, "cpu")
    ids = torch.randint(0, 96, (2, 19))
    assert (session.logits(ids) - hf_logits(hf, ids)).abs().max() < 1e-4
    prompt = ids[0, :7].tolist()
    assert session.generate(prompt, 9) == greedy_reference(load_decoder(md), prompt, 9)
    assert api.run_prompt(tmp_path, prompt, 9) == session.generate(prompt, 9)  # artifact root or model/


def test_run_prompt_loads_one_row(tmp_path, monkeypatch):
    """`run` decodes one prompt: its runtime has max_batch 1 (one bucket to warm up, not the artifact's 1-32) unless
    the caller sets it, and gives the tokens of the artifact's own runtime."""
    hf = make_model("llama")
    from lorafast_export.weights import open_model

    out = lower(open_model(save_model(hf, tmp_path / "merged")), tmp_path / "model", max_seq_len=64)
    loaded, real = [], api.load
    monkeypatch.setattr(api, "load", lambda *a, **kw: loaded.append(real(*a, **kw)) or loaded[-1])
    prompt = [5, 9, 1, 44, 3]
    want = get_target("torch-compile").load(out, "cpu").generate(prompt, 6)
    assert api.run_prompt(tmp_path, prompt, 6) == want
    assert api.run_prompt(tmp_path, prompt, 6, max_batch=4) == want
    assert [rt.engine.buckets for rt in loaded] == [(1,), (1, 2, 4)]


def int8_rows(w: torch.Tensor) -> torch.Tensor:
    """w [out, in] through int8 per output channel, symmetric, written out here as an independent truth: the
    signed grid [-128, 127], scale = the row's value of largest magnitude / -128, codes rounded to nearest."""
    w = w.float()
    extreme = w.gather(1, w.abs().argmax(1, keepdim=True))  # [out, 1]
    scale = extreme / -128
    return (w / scale).round().clamp(-128, 127) * scale


def round_trip_kernels(tmp_path, md, fp, q, meta, **options) -> set[str]:
    """Lower the quantized model, load it back on the CPU, check it against the fake-quant decoder (logits,
    greedy tokens), whose lm_head is int8_rows' where the artifact says it stored the head in int8 (option
    lm_head, auto by default); the kernels its linears run."""
    out = lower(md, tmp_path / "model", QuantizedModel(md.config, fp, q, meta), **options)
    session = get_target("torch-compile").load(out, "cpu")
    ref = fake_quant_decoder(md, q)
    if read_meta(out)["options"]["lm_head"] == "int8":
        ref.lm_head.weight.data = int8_rows(ref.lm_head.weight)
    ids = torch.randint(0, 96, (1, 11))
    with torch.no_grad():
        want = ref(ids)[0]
    assert (session.logits(ids) - want).abs().max() < 1e-3 * want.abs().max()
    assert session.generate(ids[0].tolist(), 6) == greedy_reference(ref, ids[0].tolist(), 6)
    return {k for p, k in session.runtime.kernels.items() if p != "lm_head"}


def test_quantized_round_trip_matches_fake_quant(tmp_path):
    md = tiny_checkpoint(tmp_path, hidden=128, intermediate_size=256)
    fp, q = quantize_all(md, bits=4, group_size=64, symmetric=False)
    assert round_trip_kernels(tmp_path, md, fp, q, {"method": "rtn", "bits": 4}) == {"int4_tinygemm"}


def test_quantized_artifact_stores_an_int8_head_unless_kept(tmp_path):
    """lm_head auto: a quantized artifact's untied head is stored int8 per channel (runtime.json says so, the logits
    are the fake-quant decoder's with int8_rows' head, not its bf16 head's); keep: the head as the quantized form
    holds it; int8 on an unquantized build, or a bad value, is refused by name."""
    md = tiny_checkpoint(tmp_path, hidden=128, intermediate_size=256, vocab=512)
    assert not md.config.tie_word_embeddings
    fp, q = quantize_all(md, bits=4, group_size=64, symmetric=False)
    qm = QuantizedModel(md.config, fp, q, {"method": "rtn", "bits": 4})
    ids = torch.randint(0, 512, (1, 11))
    ref = fake_quant_decoder(md, q)
    with torch.no_grad():
        fp_head = ref(ids)[0]
        ref.lm_head.weight.data = int8_rows(ref.lm_head.weight)
        int8_head = ref(ids)[0]
    gap = (fp_head - int8_head).abs().max()
    assert gap > 1e-3  # the two heads are told apart below
    for option, want in (("auto", int8_head), ("int8", int8_head), ("keep", fp_head)):
        out = lower(md, tmp_path / option, qm, lm_head=option)
        assert read_meta(out)["options"]["lm_head"] == ("keep" if option == "keep" else "int8")
        session = get_target("torch-compile").load(out, "cpu")
        assert ("lm_head" in session.runtime.kernels) == (option != "keep")
        assert (session.logits(ids) - want).abs().max() < gap / 20, option
    with pytest.raises(InputError, match="lm_head: int8"):
        lower(md, tmp_path / "fp", None, lm_head="int8")
    with pytest.raises(InputError, match="lm_head='int4'"):
        lower(md, tmp_path / "bad", qm, lm_head="int4")


def test_tied_head_stays_as_stored(tmp_path):
    md = tiny_checkpoint(tmp_path, "qwen2", tie=True, hidden=128, intermediate_size=256)
    fp, q = quantize_all(md, bits=4, group_size=64, symmetric=False)
    out = lower(md, tmp_path / "model", QuantizedModel(md.config, fp, q, {"method": "rtn", "bits": 4}))
    assert read_meta(out)["options"]["lm_head"] == "keep"


def test_smoothquant_artifact_runs_the_int8_product(tmp_path):
    """A W8A8 artifact keeps its per-token activation scheme through the files: loaded back, every linear runs
    W8A8Linear (the int8 GEMM) and the artifact computes the fake-quant model's logits and greedy tokens."""
    md = tiny_checkpoint(tmp_path, hidden=128, intermediate_size=256)
    fp, q = quantize_all(md, bits=8, group_size=-1, symmetric=True)
    q = {p: with_fields(qt, act_quant=ACT_QUANT_INT8_PER_TOKEN) for p, qt in q.items()}
    assert round_trip_kernels(tmp_path, md, fp, q, {"method": "smoothquant", "bits": 8}) == {"w8a8"}


def test_saved_quantized_model_streams_into_the_artifact(tmp_path, monkeypatch):
    """A quantized model saved by the quantize stage (lazy, read from disk) is copied into qweights tensor by tensor
    (never all its codes in memory: save_qtensors, which takes them all at once, is not called; the int8 head is
    written from memory after them) and read back lazily at load: the same tensors as save_qtensors writes, and
    the same logits as in memory."""
    from lorafast_export.model import quantized as quantized_module
    from lorafast_export.model.quantized import LazyQTensors, load_quantized, save_quantized
    from lorafast_export.qform import load_qtensors
    from lorafast_export.runtime.artifact import read_meta, read_weights

    md = tiny_checkpoint(tmp_path, hidden=128, intermediate_size=256)
    fp, q = quantize_all(md, bits=4, group_size=64, symmetric=False)
    qm = QuantizedModel(md.config, fp, q, {"method": "rtn", "bits": 4})
    lazy = load_quantized(save_quantized(qm, tmp_path / "q"))
    with monkeypatch.context() as m:
        m.setattr(
            quantized_module, "save_qtensors", lambda *a, **k: pytest.fail("the lazy codes were loaded whole")
        )
        streamed = lower(md, tmp_path / "streamed", lazy)
    whole = lower(md, tmp_path / "whole", qm)
    a, b = load_qtensors(streamed / "qweights.safetensors"), load_qtensors(whole / "qweights.safetensors")
    assert (
        a.keys() == b.keys() == {*q.keys(), "lm_head"}
    )  # the head int8 (lm_head auto), from the lazy fp too
    for name in a:
        for f in ("codes", "scales", "zeros", "g_idx", "bias", "input_scale"):
            x, y = getattr(a[name], f), getattr(b[name], f)
            assert (x is None and y is None) or torch.equal(x, y), (name, f)
    _, read = read_weights(streamed, read_meta(streamed), "cpu")
    assert isinstance(read, LazyQTensors)
    ids = torch.randint(0, 96, (1, 11))
    s1, s2 = (get_target("torch-compile").load(d, "cpu") for d in (streamed, whole))
    assert torch.equal(s1.logits(ids), s2.logits(ids))


def test_bench_reports_numbers(tmp_path):
    md = tiny_checkpoint(tmp_path)
    out = lower(md, tmp_path / "model", dtype="bfloat16", max_seq_len=32)
    r = api.bench(out, [1, 2], prompt_len=8, new_tokens=4)
    assert r["dtype"] == "bfloat16" and [x["batch"] for x in r["results"]] == [1, 2]
    assert all(x["new_tokens"] == 4 * x["batch"] and x["decode_tokens_per_s"] > 0 for x in r["results"])


def test_unknown_and_bad_options_are_named(tmp_path):
    md = tiny_checkpoint(tmp_path)
    with pytest.raises(InputError, match="unknown key.*flash"):
        lower(md, tmp_path / "a", flash=True)
    with pytest.raises(InputError) as e:
        lower(md, tmp_path / "b", block_size=12, attention="paged", speculation="never")
    assert "block_size=12" in str(e.value) and "attention='paged'" in str(e.value)
    assert "speculation='never': use one of auto, always" in str(e.value)


@pytest.mark.slow
def test_aot_package_loads_and_matches(tmp_path):  # ~2 min of C++ compilation on a 2-core CPU
    md = tiny_checkpoint(tmp_path, layers=1)
    out = lower(md, tmp_path / "model", aot=True, max_seq_len=32, max_batch=4)
    assert (out / "decode.pt2").exists() and (out / "prefill.pt2").exists()
    aot = api.load(out, "cpu")
    plain = api.load(out, "cpu", use_aot=False)
    assert aot.aot and not plain.aot
    ids = torch.randint(0, 96, (2, 9))
    assert (aot.logits(ids) - plain.logits(ids)).abs().max() < 1e-4
    prompts = [ids[0].tolist(), ids[1, :1].tolist(), ids[1, :5].tolist()]
    assert aot.generate_batch(prompts, 6) == plain.generate_batch(prompts, 6)


def test_int4_artifact_drafts_for_the_bf16_artifact(tmp_path):
    """`run --draft`: the int4 build of the same model drafts; the tokens are the fp model's greedy ones."""
    md = tiny_checkpoint(tmp_path, hidden=128, intermediate_size=256)
    fp_dir = lower(md, tmp_path / "fp" / "model", max_seq_len=64)
    fp, q = quantize_all(md, bits=4, group_size=32)
    q_dir = lower(
        md, tmp_path / "q4" / "model", QuantizedModel(md.config, fp, q, {"method": "rtn", "bits": 4})
    )
    prompt = torch.randint(0, 96, (9,)).tolist()
    want = greedy_reference(load_decoder(md), prompt, 20)
    rt = api.load(fp_dir, "cpu", draft=q_dir)  # speculation auto: plain steps timed first, then rounds
    assert rt.generate_batch([prompt], 20)[0] == want
    rt = api.load(fp_dir, "cpu", draft=q_dir, speculation="always")
    assert rt.generate_batch([prompt], 20)[0] == want
    assert rt.engine.stats.spec_rounds > 0 and rt.engine.stats.accepted > 0
    res = api.bench(fp_dir, [1], 8, 12, "cpu", draft=q_dir, speculation="always")
    assert res["results"][0]["spec_acceptance"] is not None and res["results"][0]["spec_rounds"] > 0
    assert res["results"][0]["spec_decisions"] == []  # "always" decides nothing
    # auto: its probe's verdict is reported with the rates it judged
    res = api.bench(fp_dir, [1], 8, 40, "cpu", draft=q_dir, speculation="auto")
    (d, *_) = res["results"][0]["spec_decisions"]
    assert d["from"] == "probe_spec" and d["probe_rounds"] >= 2
    assert d["plain_ms"] > 0 and d["spec_ms_per_token"] > 0
    # a tiny model's step on the CPU costs little beside a round: its probe may stop at the second round ("bound")
    assert d["decision"] == "spec" or d["decision"].startswith("pause ")
    assert d["why"] != "bound" or d["round_ms"] > 5 * d["plain_ms"]  # the bound: k + 1 plain steps


def test_draft_with_another_vocabulary_is_refused(tmp_path):
    md = tiny_checkpoint(tmp_path)
    other = tiny_checkpoint(tmp_path / "o", vocab=128)
    a, b = lower(md, tmp_path / "a" / "model"), lower(other, tmp_path / "b" / "model")
    with pytest.raises(InputError, match="vocabulary 128 differs"):
        api.load(a, "cpu", draft=b)


def test_draft_int4_head_quantizes_only_the_drafts_head_and_keeps_the_output(tmp_path):
    """Option draft_int4_head: the draft's lm_head is quantized at load (int4 RTN), the model's is not, and the
    speculative output is still the model's own greedy output (the model verifies every drafted token)."""
    from lorafast_export.qform import dequantize
    from lorafast_export.quant.rtn import quantize_rtn
    from lorafast_export.runtime.linear import Int4Linear

    md = tiny_checkpoint(tmp_path, hidden=128, intermediate_size=256)
    fp_dir = lower(md, tmp_path / "fp" / "model", max_seq_len=64)
    prompt = torch.randint(0, 96, (9,), generator=torch.Generator().manual_seed(4)).tolist()
    want = greedy_reference(load_decoder(md), prompt, 20)
    rt = api.load(fp_dir, "cpu", draft=fp_dir, speculation="always", draft_int4_head=True)
    draft_head, head = rt.engine.draft.dec.lm_head, rt.model.dec.lm_head
    assert isinstance(head, torch.nn.Linear) and isinstance(draft_head, Int4Linear)
    # the stored head's int4 RTN g128 (the fake-quant reference): what the draft's head computes
    fake = dequantize(quantize_rtn(head.weight.detach(), 4, 128, False, scale_dtype=torch.float16))
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got, exact, want_q = draft_head(x), head(x), x @ fake.T
    assert (got - want_q).abs().max() <= 1e-4 * want_q.abs().max()
    assert (got - exact).abs().max() > 1e-3 * exact.abs().max()  # it is not the stored head
    assert rt.generate_batch([prompt], 20)[0] == want
    assert rt.engine.stats.spec_rounds > 0 and rt.engine.stats.accepted > 0
    # off (the default): the draft keeps its head as stored
    plain = api.load(fp_dir, "cpu", draft=fp_dir, speculation="always")
    assert isinstance(plain.engine.draft.dec.lm_head, torch.nn.Linear)


def test_draft_int4_makes_the_artifact_its_own_int4_draft(tmp_path):
    """open_runtime(draft_int4=True) (`--speculative int4`): the draft's decoder linears are int4 (RTN) at load and
    compute the fake-quant product, its lm_head int8 per channel (what a build's lm_head option gives a quantized
    artifact) computing that fake-quant product; the model's stay dense; the output is the model's greedy output."""
    from lorafast_export.qform import dequantize
    from lorafast_export.quant.int8 import quantize_int8_weight
    from lorafast_export.runtime.linear import Int4Linear, _QuantLinearBase

    md = tiny_checkpoint(tmp_path, hidden=128, intermediate_size=256)
    fp_dir = lower(md, tmp_path / "fp" / "model", max_seq_len=64)
    prompt = torch.randint(0, 96, (9,), generator=torch.Generator().manual_seed(6)).tolist()
    want = greedy_reference(load_decoder(md), prompt, 20)
    rt = api.load(fp_dir, "cpu", draft=fp_dir, draft_int4=True, speculation="always")
    kinds = lambda dec: {type(m).__name__ for layer in dec.model.layers for m in layer.modules()}  # noqa: E731
    assert "Int4Linear" in kinds(rt.engine.draft.dec) and "Linear" not in kinds(rt.engine.draft.dec)
    draft_head, head = rt.engine.draft.dec.lm_head, rt.model.dec.lm_head
    assert isinstance(draft_head, _QuantLinearBase) and isinstance(head, torch.nn.Linear)
    fake = dequantize(quantize_int8_weight(head.weight.detach()))  # the int8 head's fake-quant reference
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        got, exact, want_q = draft_head(x), head(x), x @ fake.T
    assert (got - want_q).abs().max() <= 1e-5 * want_q.abs().max()
    assert (got - exact).abs().max() > 1e-6 * exact.abs().max()  # it is not the stored head
    assert not any(isinstance(m, _QuantLinearBase) for m in rt.model.dec.modules())
    assert rt.generate_batch([prompt], 20)[0] == want
    assert rt.engine.stats.spec_rounds > 0 and 0 < rt.engine.stats.accepted
    # with draft_int4_head the draft's head is int4 instead
    rt4 = api.load(fp_dir, "cpu", draft=fp_dir, draft_int4=True, speculation="always", draft_int4_head=True)
    assert isinstance(rt4.engine.draft.dec.lm_head, Int4Linear)
