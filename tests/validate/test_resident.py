"""A device-resident base (validate/resident.py) gives exactly the numbers of the streamed one: each base tensor is
read once, decoders of resident stages build their layers at each step, and the report does not change. Forced
onto the CPU here (on a GPU, build_candidates' caller makes it resident when it fits)."""

import json

import pytest
import torch
from click.testing import CliRunner

from lorafast_export.adapters import open_adapter
from lorafast_export.cli import main
from lorafast_export.merge import plan_merge
from lorafast_export.recipe import Recipe
from lorafast_export.report.json_report import to_json
from lorafast_export.validate.candidates import merged_fp32_candidate, source_candidate
from lorafast_export.validate.greedy import decoder_greedy_batch, joint_greedy_batch
from lorafast_export.validate.layers import MergedSource, UnmergedSource, _LayersOnDemand
from lorafast_export.validate.resident import ResidentStore, make_resident, stored_bytes
from lorafast_export.validate.run import ValidationInputs, run_validation
from lorafast_export.validate.stream import walk
from lorafast_export.weights import open_model
from tests.merge.test_merge_vs_peft import ALL
from tests.tiny import save_base_and_adapter, write_text
from tests.validate.test_run import build, inputs  # noqa: F401 (a fixture)

PROMPTS = [[1, 5, 9, 13, 2, 7, 30], [1, 40], [1, 3, 3, 3, 8, 50, 60, 61], [1, 77, 20, 4]]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("resident")
    save_base_and_adapter(root, {"layers": 2}, half_base=True, target_modules=ALL, use_dora=True)
    write_text(root / "e.txt", n_chars=600)
    (root / "p.txt").write_text("the model\nint x\n")
    return root


def _inputs(root, resident: bool):
    base, ads = open_model(root / "base"), [open_adapter(str(root / "ad"))]
    return make_resident(base, ads, "cpu", force=True) if resident else (base, ads)


def _sources(plan):
    return [UnmergedSource(plan, "base"), MergedSource("merged-fp16", plan, "base", "base")]


def test_not_resident_on_the_cpu_unless_forced(root, monkeypatch):
    base, ads = open_model(root / "base"), [open_adapter(str(root / "ad"))]
    assert make_resident(base, ads, "cpu") == (base, ads)
    monkeypatch.setenv("LORAFAST_RESIDENT", "1")  # the CPU rehearsal of a GPU build
    assert isinstance(make_resident(base, ads, "cpu")[0].store, ResidentStore)
    monkeypatch.setenv("LORAFAST_RESIDENT", "0")
    assert make_resident(base, ads, "cpu", force=True) == (base, ads)


def test_resident_decoders_equal_streamed_ones_and_read_the_base_once(root):
    base, ads = _inputs(root, True)
    store = base.store
    assert isinstance(store, ResidentStore) and store.bytes_read == 0
    plan, plain = plan_merge(base, ads), plan_merge(*_inputs(root, False))
    ids = torch.randint(0, 96, (2, 12))
    walk(_sources(plan), ids, "cpu")
    for src, ref in zip(_sources(plan), _sources(plain), strict=True):
        assert src.builds_on_device("cpu") and not ref.builds_on_device("cpu")
        dec, whole = src.decoder("cpu"), ref.decoder("cpu")
        assert isinstance(dec.model.layers, _LayersOnDemand)
        assert torch.equal(dec(ids)[0], whole(ids)[0]), src.name
        assert decoder_greedy_batch(dec, PROMPTS, 5) == decoder_greedy_batch(whole, PROMPTS, 5), src.name
    # the walk and four decoders (two on demand, decoding 5 steps) read each base tensor exactly once
    assert store.bytes_read == stored_bytes(store.store)
    store.release()  # afterwards the stages read the wrapped store again and build whole decoders
    assert not _sources(plan)[0].builds_on_device("cpu")
    assert torch.equal(store.get("model.norm.weight"), plain.base.store.get("model.norm.weight"))
    assert store.bytes_read > stored_bytes(store.store)


def test_joint_decoding_equals_each_decoder_alone(root):
    """joint_greedy_batch (the greedy check of the stages built from a resident base, decoded together) gives each
    decoder the tokens it decodes alone: two on-demand decoders sharing their layers' merge, and a held decoder
    damaged so that its tokens differ (a joint decode that fed one decoder another's tokens would fail)."""
    base, ads = _inputs(root, True)
    plan, plain = plan_merge(base, ads), plan_merge(*_inputs(root, False))
    fp32, fp16 = MergedSource("merged-fp32", plan, "base"), MergedSource("merged-fp16", plan, "base", "base")
    damaged = MergedSource("merged-fp32", plain, "base").decoder("cpu")
    with torch.no_grad():
        damaged.model.layers[0].mlp.down_proj.weight.mul_(-40.0)
    decs = [fp32.decoder("cpu"), fp16.decoder("cpu"), damaged]
    assert all(isinstance(d.model.layers, _LayersOnDemand) for d in decs[:2])
    alone = [decoder_greedy_batch(d, PROMPTS, 6) for d in decs]
    assert alone[2] != alone[0]
    assert joint_greedy_batch(decs, PROMPTS, 6) == alone


def test_report_is_the_same_with_a_resident_base(root, tmp_path):
    recipe = Recipe().with_overrides(
        {
            "validate.eval": [{"name": "e", "path": str(root / "e.txt")}],
            "validate.prompts": str(root / "p.txt"),
        }
    )
    reports = []
    for resident in (False, True):
        base, ads = _inputs(root, resident)
        plan = plan_merge(base, ads)
        cands = [
            merged_fp32_candidate(plan),
            source_candidate(MergedSource("merged-fp16", plan, "base", "base")),
        ]
        v = ValidationInputs(base, ads, recipe, cands, "t", "hf", "none")
        reports.append(json.loads(to_json(run_validation(v, tmp_path / f"out{resident}"))))
        # freed once the walk and the heads had read it (before the comparisons and the sessions' decoding)
        assert not resident or not base.store.active
    assert reports[0]["stages"] == reports[1]["stages"]
    assert reports[0]["stages"][0]["greedy_match"] == 1.0


def test_revalidation_is_the_same_with_a_resident_base(inputs, monkeypatch):  # noqa: F811
    """`validate --artifact` holds the base the same way (validate_artifact): same report, base released."""
    assert build(inputs, "--no-validate").exit_code == 0
    args = [
        "validate",
        "--artifact",
        inputs / "out",
        "--eval",
        f"a={inputs / 'a.txt'}",
        "--max-tokens",
        "300",
    ]
    args += ["--prompts", inputs / "prompts.jsonl"]
    stages = []
    for choice in ("0", "1"):
        monkeypatch.setenv("LORAFAST_RESIDENT", choice)
        r = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
        assert r.exit_code == 0, r.output
        assert ("resident base:" in r.output) == (choice == "1"), r.output
        stages.append(json.loads((inputs / "out" / "report.json").read_text())["stages"])
    assert stages[0] == stages[1] and [s["name"] for s in stages[0]] == ["merged-fp32", "artifact"]


@pytest.mark.parametrize("dtype", [torch.uint8, torch.bfloat16, torch.float16, torch.float32, torch.int32])
def test_staging_copies_exactly(dtype):
    """Staging (the pinned buffer host tensors take to a GPU; unpinned on a CPU): the copy has the source's
    values, dtype and shape, a non-contiguous source included, and a smaller copy after a larger one reuses the
    buffer without leaking the larger one's bytes."""
    from lorafast_export.validate.resident import Staging

    g = torch.Generator().manual_seed(0)
    st = Staging("cpu")
    big = (torch.rand(64, 48, generator=g) * 200).to(dtype)
    small = (torch.rand(6, 10, generator=g) * 200).to(dtype).T  # non-contiguous
    for t in (big, small, torch.zeros(0, 3, dtype=dtype)):
        out = st.to_device(t)
        assert out.dtype == t.dtype and out.shape == t.shape and out.is_contiguous()
        assert torch.equal(out, t)
        if dtype == torch.bfloat16:  # numpy has no bfloat16 (the cache writes float16/float32 logits)
            continue
        back = st.to_host(t)  # the other direction (device -> host; here both are the CPU)
        assert back.shape == tuple(t.shape) and torch.equal(torch.from_numpy(back.copy()), t)
    assert st.buffer(1).numel() == big.numel() * big.element_size()  # grown once, then reused
