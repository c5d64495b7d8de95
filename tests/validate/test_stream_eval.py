"""The layer-streamed evaluator gives the numbers a whole-model evaluation gives: each candidate's logits from
its whole decoder, the reference's from transformers + PEFT, metrics from the same accumulators. With the
reference streamed (our unmerged forward, for models over the PEFT size limit) the report barely moves."""

import json
import shutil
import threading

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorafast_export.adapters import open_adapter
from lorafast_export.merge import merged_state, plan_merge
from lorafast_export.model.decoder import build_decoder
from lorafast_export.recipe import Recipe
from lorafast_export.validate import greedy as greedy_mod
from lorafast_export.validate import run as run_mod
from lorafast_export.validate.candidates import (
    decoder_candidate,
    decoder_greedy,
    merged_fp32_candidate,
    session_candidate,
)
from lorafast_export.validate.data import load_eval_sets
from lorafast_export.validate.metrics import MetricAccumulator
from lorafast_export.validate.reference import Reference
from lorafast_export.validate.run import ValidationInputs, run_validation
from lorafast_export.weights import open_model
from tests.merge.test_merge_vs_peft import ALL
from tests.tiny import save_base_and_adapter, write_text


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("se")
    save_base_and_adapter(root, {"layers": 2}, half_base=True, target_modules=ALL, use_dora=True)
    write_text(root / "e.txt", n_chars=2500)
    (root / "p.txt").write_text("the model\n")
    bm, ad = open_model(root / "base"), open_adapter(str(root / "ad"))
    return root, bm, ad, plan_merge(bm, [ad])


def _recipe(root, second_set=False):
    second = (
        [{"name": "f", "path": str(write_text(root / "f.txt", n_chars=2000, seed=1))}] if second_set else []
    )
    return Recipe().with_overrides(
        {
            "validate.eval": [{"name": "e", "path": str(root / "e.txt")}, *second],
            "validate.max_tokens": 600,
            "validate.block_size": 128,
            "validate.prompts": str(root / "p.txt"),
            "validate.max_new_tokens": 4,
        }
    )


class _Session:
    """A runtime session (whole-model logits, its own greedy decoding) around a decoder."""

    def __init__(self, dec, decodes_beside_logits=False):
        self.dec, self.decodes_beside_logits = dec, decodes_beside_logits

    @torch.no_grad()
    def logits(self, ids):
        return self.dec(ids)[0]

    def generate(self, prompt, n):
        return decoder_greedy(self.dec, prompt, n)


def _report(setup, tmp_path, session=False):
    """session: runtime session stages after the artifact, and a second eval set."""
    root, bm, ad, plan = setup
    noisy = merged_state(plan, torch.float32)
    w = noisy["model.layers.0.mlp.up_proj.weight"]
    g = torch.Generator().manual_seed(0)
    noisy["model.layers.0.mlp.up_proj.weight"] = w + 0.02 * torch.randn(w.shape, generator=g)
    cands = [merged_fp32_candidate(plan), decoder_candidate("artifact", build_decoder(bm.config, noisy))]
    if session:  # runtime stages after the artifact, the way a target's session is one
        cands.append(session_candidate("runtime", _Session(build_decoder(bm.config, noisy))))
        cands.append(session_candidate("runtime-own", _Session(build_decoder(bm.config, noisy), True)))
    v = ValidationInputs(bm, [ad], _recipe(root, second_set=session), cands, "se", "hf", "none")
    return run_validation(v, tmp_path), noisy


def test_streamed_evaluator_equals_whole_model_evaluation(setup, tmp_path):
    root, bm, ad, plan = setup
    rep, noisy = _report(setup, tmp_path)
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(bm.path)
    (es,) = load_eval_sets(tok, [("e", root / "e.txt")], 128, 600)
    ref = Reference(bm, [ad])
    whole = {
        "merged-fp32": build_decoder(bm.config, merged_state(plan, torch.float32)),
        "artifact": build_decoder(bm.config, noisy),
    }
    acc = {k: MetricAccumulator() for k in whole}
    for block in es.blocks:
        r = ref.logits(block[None])[0, :-1]
        for k, dec in whole.items():
            with torch.no_grad():
                acc[k].update(r, dec(block[None])[0][0, :-1], block[1:])
    by = {s.name: s for s in rep.stages}
    for k, a in acc.items():
        want = a.result()
        assert by[k].kl_mean == pytest.approx(want["kl_mean"], rel=1e-3, abs=1e-9), k
        assert by[k].top1 == want["top1"], k
        assert by[k].ppl_ratio == pytest.approx(want["ppl_ratio"], rel=1e-6), k
    assert by["artifact"].kl_mean > 1e-4  # the perturbation is seen
    assert rep.eval_sets[0].ppl_ref == pytest.approx(want["ppl_ref"], rel=1e-9)


def test_streamed_reference_report_matches_peft_reference_report(setup, tmp_path, monkeypatch):
    """Over the PEFT size limit the reference is our streamed unmerged forward; on a CPU it decodes the greedy
    prompts with its layers built again at each step (no whole fp32 model is allowed on the host here): the
    greedy numbers are PEFT's."""
    peft_rep, _ = _report(setup, tmp_path / "peft")
    monkeypatch.setattr(run_mod, "PEFT_REFERENCE_MAX_BYTES", 0)  # as for a model over the limit
    monkeypatch.setattr(greedy_mod, "HOST_DECODE_MAX_BYTES", 0)  # no whole fp32 copy on the host
    assert run_mod.reference_kind(setup[1]) == "stream"
    stream_rep, _ = _report(setup, tmp_path / "stream")
    assert stream_rep.artifact.validation_note is None
    a, b = {s.name: s for s in peft_rep.stages}, {s.name: s for s in stream_rep.stages}
    for name in a:
        assert b[name].kl_mean == pytest.approx(a[name].kl_mean, rel=1e-2, abs=1e-9), name
        assert b[name].top1 == pytest.approx(a[name].top1, abs=1e-2), name
        assert b[name].greedy_match == a[name].greedy_match, name
    assert stream_rep.eval_sets[0].ppl_ref == pytest.approx(peft_rep.eval_sets[0].ppl_ref, rel=1e-5)
    assert stream_rep.eval_sets[0].ppl_base == pytest.approx(peft_rep.eval_sets[0].ppl_base, rel=1e-5)


def test_streamed_reference_over_the_host_budget_skips_greedy_with_a_note(setup, tmp_path, monkeypatch):
    """A checkpoint larger than the CPU's re-read budget (the 13B shape on a 23 GiB machine) skips the greedy
    check with a note that says why and what to do; the other metrics stay."""
    monkeypatch.setattr(run_mod, "PEFT_REFERENCE_MAX_BYTES", 0)
    monkeypatch.setattr(greedy_mod, "HOST_DECODE_MAX_BYTES", 0)
    monkeypatch.setattr(greedy_mod, "HOST_STREAM_DECODE_MAX_BYTES", 1000)
    rep, _ = _report(setup, tmp_path)
    note = rep.artifact.validation_note
    assert (
        "greedy check skipped" in note
        and "re-reads the whole checkpoint" in note
        and "validate.device cuda" in note
    )
    assert all(s.greedy_match is None for s in rep.stages)
    assert rep.stages[0].kl_mean < 1e-6


def test_on_demand_decoder_decodes_as_the_whole_one(setup):
    """The streamed reference's decoder with its layers built at each step (a CPU's greedy check beyond the host
    limit) gives the tokens of the same decoder holding all its layers, and holds none of them."""
    from lorafast_export.validate.greedy import decoder_greedy_batch
    from lorafast_export.validate.layers import UnmergedSource, _LayersOnDemand

    _, _, _, plan = setup
    prompts = [[1, 5, 9, 3], [2, 7], [4, 4, 4, 8, 1]]
    whole = UnmergedSource(plan, "base").decoder("cpu", on_demand=False)
    lazy = UnmergedSource(plan, "base").decoder("cpu", on_demand=True)
    assert isinstance(lazy.model.layers, _LayersOnDemand)
    assert decoder_greedy_batch(lazy, prompts, 6) == decoder_greedy_batch(whole, prompts, 6)


def test_worker_thread_leaves_the_report_unchanged(setup, tmp_path, monkeypatch):
    """On a CPU the transformers + PEFT reference, the sessions' logits and the greedy decoding run in a worker
    thread beside the walk, and the worker then compares eval sets beside the main thread (run.Beside); the report
    is, to the last bit, the one the in-line order gives (the order validation keeps on a GPU), with runtime
    sessions among the stages (one decodes in the worker) and two eval sets (here the main thread waits at the
    first until the worker has taken the second)."""
    from lorafast_export.report.json_report import to_json

    ran_in, worker_compares = [], threading.Event()
    fill, compare = run_mod._fill_reference_peft, run_mod._compare

    def watched_compare(es, *a):
        if threading.current_thread() is not threading.main_thread():
            ran_in.append(f"compare {es.name} in the worker")
            worker_compares.set()
        elif run_mod.BESIDE_ON_CPU:
            assert worker_compares.wait(timeout=120)
        return compare(es, *a)

    monkeypatch.setattr(
        run_mod, "_fill_reference_peft", lambda *a: ran_in.append(threading.current_thread().name) or fill(*a)
    )
    monkeypatch.setattr(run_mod, "_compare", watched_compare)
    reports = {}
    for threaded in (True, False):
        monkeypatch.setenv(
            "LORAFAST_CACHE", str(tmp_path / f"cache-{threaded}")
        )  # cold: the reference is computed
        monkeypatch.setattr(run_mod, "BESIDE_ON_CPU", threaded)
        rep, _ = _report(setup, tmp_path / f"out-{threaded}", session=True)
        reports[threaded] = to_json(rep)
    main = threading.main_thread().name
    assert ran_in[0] != main and ran_in[1] == "compare f in the worker" and ran_in[2] == main
    stages = json.loads(reports[True])["stages"]
    assert {"runtime", "runtime-own"} <= {s["name"] for s in stages}
    assert {s["eval_set"] for s in stages} == {"e", "f"}
    assert all(s["greedy_match"] is not None for s in stages)  # every stage decoded
    assert reports[True] == reports[False]


@pytest.mark.parametrize("kind", ["peft", "stream"])
def test_another_adapter_on_the_same_base_reuses_the_bare_base(setup, tmp_path, monkeypatch, kind):
    """The bare base's log-probs are cached by the base alone: validating a second adapter on the same base walks
    no bare-base stage and reports exactly what a cold cache gives, while its reference is computed afresh (the new
    adapter changes it), by transformers + PEFT or streamed. A base with other weights does not find the entry."""
    import transformers

    from lorafast_export.validate import stream
    from tests.merge.test_merge_vs_peft import make_adapter

    root, bm, ad, _ = setup
    if kind == "stream":  # as for a model over the PEFT size limit
        monkeypatch.setattr(run_mod, "PEFT_REFERENCE_MAX_BYTES", 0)
    assert run_mod.reference_kind(bm) == kind
    base_model = transformers.AutoModelForCausalLM.from_pretrained(root / "base", dtype=torch.float32)
    make_adapter(base_model, tmp_path / "ad2", seed=7, target_modules=ALL)
    ad2 = open_adapter(str(tmp_path / "ad2"))
    walked, real_walk = [], stream.walk
    monkeypatch.setattr(
        stream,
        "walk",
        lambda sources, *a, **k: walked.append([s.name for s in sources]) or real_walk(sources, *a, **k),
    )

    def report(adapter, cache):
        monkeypatch.setenv("LORAFAST_CACHE", str(tmp_path / cache))
        cands = [merged_fp32_candidate(plan_merge(bm, [adapter]))]
        v = ValidationInputs(bm, [adapter], _recipe(root), cands, "se", "hf", "none")
        return run_validation(v, tmp_path / f"out-{len(walked)}")

    first = report(ad, "shared")
    assert "base" in walked[-1]  # cold: the bare base is a stage of the walk
    warm = report(ad2, "shared")
    assert "base" not in walked[-1] and "merged-fp32" in walked[-1]
    cold = report(ad2, "cold")
    assert "base" in walked[-1]
    w, c = warm.eval_sets[0], cold.eval_sets[0]
    assert (w.ppl_base, w.ppl_ref) == (c.ppl_base, c.ppl_ref)
    assert [(s.kl_mean, s.top1, s.ppl_ratio) for s in warm.stages] == [
        (s.kl_mean, s.top1, s.ppl_ratio) for s in cold.stages
    ]
    assert w.ppl_base == first.eval_sets[0].ppl_base and w.ppl_ref != first.eval_sets[0].ppl_ref

    # another base (its weights changed, same config) gets its own bare-base entry
    other = tmp_path / "other-base"
    shutil.copytree(root / "base", other)
    bumped = {k: t + 0.01 for k, t in load_file(other / "model.safetensors").items()}
    save_file(bumped, other / "model.safetensors", metadata={"format": "pt"})
    other_bm = open_model(other)
    monkeypatch.setenv("LORAFAST_CACHE", str(tmp_path / "shared"))
    v = ValidationInputs(
        other_bm, [ad], _recipe(root), [merged_fp32_candidate(plan_merge(other_bm, [ad]))], "se", "hf", "none"
    )
    again = run_validation(v, tmp_path / "out-other")
    assert "base" in walked[-1] and again.eval_sets[0].ppl_base != w.ppl_base
