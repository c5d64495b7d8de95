"""The batched greedy check: the same tokens as decoding each prompt alone, through transformers' generate too."""

import json

import pytest

from lorafast_export.model.decoder import build_decoder
from lorafast_export.model.spec import ModelConfig
from lorafast_export.recipe import Recipe
from lorafast_export.validate import greedy
from lorafast_export.validate.candidates import decoder_candidate, decoder_greedy
from lorafast_export.validate.greedy import GreedyStage, decoder_greedy_batch, hf_greedy_batch, run_greedy
from tests.tiny import make_model

PROMPTS = [[1, 5, 9, 13, 2, 7, 30], [1, 40], [1, 3, 3, 3, 8, 50, 60, 61, 62, 63, 5], [1, 77, 20, 4]]


def _pair(family, **kw):
    hf = make_model(family, **kw)
    state = {k: v for k, v in hf.state_dict().items() if "rotary_emb" not in k}
    return hf, build_decoder(ModelConfig.from_dict(hf.config.to_dict()), state)


@pytest.mark.parametrize(
    "family,kw", [("llama", {}), ("qwen2", {}), ("mistral", {"sliding_window": 4}), ("llama", {"tie": True})]
)
def test_batched_equals_each_prompt_alone_and_transformers(family, kw):
    """Left padding, rope positions, the sliding window and the KV cache: one batch gives each prompt's own
    greedy tokens (our decoder alone, prompt by prompt) and transformers' batched generate agrees."""
    hf, dec = _pair(family, **kw)
    alone = [decoder_greedy(dec, p, 12) for p in PROMPTS]
    assert decoder_greedy_batch(dec, PROMPTS, 12) == alone
    assert hf_greedy_batch(hf, PROMPTS, 12, "cpu") == alone
    assert len({tuple(t) for t in alone}) > 1  # the prompts really lead to different continuations


def test_reference_tokens_are_cached_and_candidates_always_run(tmp_path):
    _, dec = _pair("llama")
    calls = {"ref": 0, "cand": 0}

    def ref_run(ch, n, tick):
        calls["ref"] += 1
        return decoder_greedy_batch(dec, ch, n, tick)

    def cand_run(ch, n, tick):
        calls["cand"] += 1
        return decoder_greedy_batch(dec, ch, n, tick)

    lines = []
    stages = [GreedyStage("c", cand_run)]
    first = run_greedy(
        GreedyStage("reference", ref_run), stages, PROMPTS, 6, tmp_path, lines.append, batch_size=3
    )
    second = run_greedy(GreedyStage("reference", ref_run), stages, PROMPTS, 6, tmp_path, lines.append)
    assert calls == {"ref": 2, "cand": 3}  # 2 batches of the reference once; the candidate every time
    assert first.tokens == second.tokens and first.tokens["reference"] == first.tokens["c"]
    assert "greedy reference: prompts 1-3/4, 6 tokens each" in lines[0]
    assert "greedy reference: prompts 4-4/4" in lines[1]
    assert any("from the cache" in m for m in lines)
    cached = next(tmp_path.glob("greedy-*.json"))
    cached.write_text("{not json")  # a damaged entry is recomputed
    run_greedy(GreedyStage("reference", ref_run), stages, PROMPTS, 6, tmp_path)
    assert calls["ref"] == 3 and json.loads(cached.read_text())["tokens"] == first.tokens["reference"]


def test_cpu_limit_skips_with_a_note(monkeypatch):
    assert greedy.decode_fits(greedy.HOST_DECODE_MAX_BYTES, "cpu") is None
    note = greedy.decode_fits(26 * 10**9, "cpu")
    assert "greedy check skipped" in note and "26.0 GB" in note and "validate.device cuda" in note
    # a streamed reference (stored bytes given) decodes layer by layer within the re-read budget, not beyond it
    monkeypatch.setattr(greedy, "_available_bytes", lambda: 24 * 2**30)
    assert greedy.decode_fits(4_400_000_000, "cpu", stored_bytes=2_200_000_000) is None
    note = greedy.decode_fits(52 * 10**9, "cpu", stored_bytes=26 * 10**9)
    assert "re-reads the whole checkpoint (26.0 GB)" in note and "8.6 GB" in note
    monkeypatch.setattr(greedy, "_available_bytes", lambda: 2 * 2**30)  # half the available memory at most
    assert "1.1 GB this validation allows" in greedy.decode_fits(
        4_400_000_000, "cpu", stored_bytes=2_200_000_000
    )
    never = GreedyStage("reference", lambda *a: pytest.fail("a skipped check must not decode"))
    res = run_greedy(never, [never], PROMPTS, 4, None, skip_note=note)
    assert res.note == note and res.tokens == {}


def test_validation_report_says_greedy_was_skipped(tmp_path, monkeypatch):
    """Above the host limit the report carries the note and no greedy numbers; the other metrics stay."""
    from lorafast_export.adapters import open_adapter
    from lorafast_export.merge import merged_state, plan_merge
    from lorafast_export.report.markdown import render_markdown
    from lorafast_export.report.schema import regate
    from lorafast_export.validate.run import ValidationInputs, run_validation
    from lorafast_export.weights import open_model
    from tests.tiny import save_base_and_adapter, write_text

    save_base_and_adapter(tmp_path, {"layers": 1}, target_modules=["q_proj", "v_proj"])
    write_text(tmp_path / "e.txt", n_chars=600)
    (tmp_path / "p.txt").write_text("the model\n")
    bm, ad = open_model(tmp_path / "base"), open_adapter(str(tmp_path / "ad"))
    cand = decoder_candidate("artifact", build_decoder(bm.config, merged_state(plan_merge(bm, [ad]))))
    recipe = Recipe().with_overrides(
        {
            "validate.eval": [{"name": "e", "path": str(tmp_path / "e.txt")}],
            "validate.prompts": str(tmp_path / "p.txt"),
            "validate.device": "cpu",  # the host limit is the CPU's rule (on a GPU machine auto means cuda)
        }
    )
    monkeypatch.setattr(greedy, "HOST_DECODE_MAX_BYTES", 1000)
    rep = run_validation(ValidationInputs(bm, [ad], recipe, [cand], "t", "hf", "none"), tmp_path / "out")
    assert "greedy check skipped" in rep.artifact.validation_note
    assert rep.stages[0].greedy_match is None and rep.stages[0].kl_max < 1e-6
    assert rep.artifact.validation_note in render_markdown(rep)
    [gate] = regate(rep, ["greedy_match>=0.5"]).gates  # a greedy gate says the check was skipped
    assert gate.passed is None and "greedy check was skipped" in gate.note
    assert "1 skipped" in render_markdown(regate(rep, ["greedy_match>=0.5"]))
    monkeypatch.setattr(greedy, "HOST_DECODE_MAX_BYTES", 1 << 30)
    rep = run_validation(ValidationInputs(bm, [ad], recipe, [cand], "t", "hf", "none"), tmp_path / "out2")
    assert rep.artifact.validation_note is None and rep.stages[0].greedy_match == 1.0


def test_progress_ticks_during_a_slow_batch(monkeypatch):
    monkeypatch.setattr(greedy, "PROGRESS_EVERY_S", 0.0)
    _, dec = _pair("llama")
    lines = []
    greedy.batched("x", lambda ch, tick: decoder_greedy_batch(dec, ch, 3, tick), PROMPTS, 3, 8, lines.append)
    assert [m.split(", ")[1] for m in lines[:3]] == ["token 1/3", "token 2/3", "token 3/3"]


def _damaged(dec, scale: float, seed: int = 0):
    """A copy of dec with every weight perturbed by `scale` relative noise (0: an exact copy)."""
    import copy

    import torch

    out = copy.deepcopy(dec)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(scale * p.abs().mean() * torch.randn(p.shape, generator=g))
    return out


def test_teacher_forcing_gives_the_greedy_metrics_of_decoding():
    """A layered stage's greedy check by teacher forcing (the prompts + the reference's tokens in one forward,
    its argmax at each position) gives the greedy metrics of the stage's own KV-cache decoding, for stages that
    match the reference, diverge midway and diverge at once."""
    import torch

    from lorafast_export.validate.greedy import teacher_forced_blocks, teacher_forced_tokens
    from lorafast_export.validate.metrics import greedy_agreement

    _, ref = _pair("llama")
    ref_tokens = decoder_greedy_batch(ref, PROMPTS, 12)
    ids, spans = teacher_forced_blocks(PROMPTS, ref_tokens)
    assert ids.shape == (len(PROMPTS), max(len(p) + 11 for p in PROMPTS))
    seen = set()
    for scale in (0.0, 0.05, 0.1, 0.2, 0.4, 3.0):
        cand = _damaged(ref, scale)
        with torch.no_grad():
            logits = cand(ids)[0]
        forced = [
            teacher_forced_tokens(r, logits[i, s : s + c].argmax(-1).tolist())
            for i, ((s, c), r) in enumerate(zip(spans, ref_tokens, strict=True))
        ]
        decoded = decoder_greedy_batch(cand, PROMPTS, 12)
        assert greedy_agreement(ref_tokens, forced) == greedy_agreement(ref_tokens, decoded), scale
        seen |= {p["first_divergence"] for p in greedy_agreement(ref_tokens, decoded)["per_prompt"]}
    assert 12 in seen and 0 in seen and seen & set(range(1, 12))  # matched, at once and midway


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="no CUDA device"),
        ),
    ],
)
def test_report_greedy_metrics_equal_each_stages_own_decoding(tmp_path, device):
    """Through run_validation: the layered stages' greedy numbers in the report (teacher-forced in the walk) are
    those of decoding each stage with its KV cache against transformers + PEFT's generate, on the CPU and on a
    GPU (where the base is held resident for the validation)."""
    from lorafast_export.adapters import open_adapter
    from lorafast_export.merge import merged_state, plan_merge
    from lorafast_export.validate.data import load_prompts
    from lorafast_export.validate.metrics import greedy_agreement
    from lorafast_export.validate.reference import Reference
    from lorafast_export.validate.resident import resident
    from lorafast_export.validate.run import ValidationInputs, _tokenizer, run_validation
    from lorafast_export.weights import open_model
    from tests.tiny import save_base_and_adapter, write_text

    save_base_and_adapter(tmp_path, {"layers": 2}, target_modules=["q_proj", "v_proj", "down_proj"])
    write_text(tmp_path / "e.txt", n_chars=600)
    lines = ["the model", "a b c d e f", "once upon a time there", "x", "numbers 1 2 3 4 5 6"]
    (tmp_path / "p.txt").write_text("\n".join(lines) + "\n")
    bm, ad = open_model(tmp_path / "base"), open_adapter(str(tmp_path / "ad"))
    merged = build_decoder(bm.config, merged_state(plan_merge(bm, [ad])))
    decs = {"exact": merged, "noisy": _damaged(merged, 0.05), "broken": _damaged(merged, 3.0)}
    recipe = Recipe().with_overrides(
        {
            "validate.eval": [{"name": "e", "path": str(tmp_path / "e.txt")}],
            "validate.prompts": str(tmp_path / "p.txt"),
            "validate.max_new_tokens": 10,
            "validate.device": device,
        }
    )
    cands = [decoder_candidate(n, d) for n, d in decs.items()]
    with resident(bm, [ad], device) as (held_base, held_ads):
        rep = run_validation(
            ValidationInputs(held_base, held_ads, recipe, cands, "t", "hf", "none"), tmp_path / "out"
        )
    prompts = load_prompts(_tokenizer(bm), tmp_path / "p.txt")
    ref = hf_greedy_batch(Reference(bm, [ad], device).model, prompts, 10, device)
    for name, dec in decs.items():
        want = greedy_agreement(ref, decoder_greedy_batch(dec.to(device), prompts, 10))
        [st] = [s for s in rep.stages if s.name == name]
        assert (st.greedy_match, st.first_divergence_mean) == (
            want["greedy_match"],
            want["first_divergence_mean"],
        ), name
    got = {s.name: s.first_divergence_mean for s in rep.stages}
    assert got["exact"] == 10 and 0 < got["noisy"] < 10 and got["broken"] < got["noisy"]
