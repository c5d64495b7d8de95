"""The speculation governor: speculate while a round's seconds per token beat a plain step's, pause otherwise,
try again after a pause that doubles while speculation keeps losing; output never depends on it."""

import pytest

from lorafast_export.errors import InputError
from lorafast_export.runtime import speculation as sp
from lorafast_export.runtime.speculation import SpecGovernor


def run(
    gov: SpecGovernor,
    bucket: int,
    n: int,
    round_s: float,
    tokens: float,
    step_s: float,
    most: int | None = None,
) -> list[bool]:
    """n decodes as the engine reports them: a round when the governor wants one, else one plain step."""
    chosen = []
    for _ in range(n):
        want = gov.wants(bucket)
        chosen.append(want)
        if want:
            gov.record_round(bucket, round_s, tokens, most)
        else:
            gov.record_plain(bucket, step_s, 1)
    return chosen


def test_a_losing_draft_is_paused_after_the_probes_and_retried_after_a_doubling_pause():
    gov = SpecGovernor("auto")
    # a round: 2.2 ms for 1 token a row (nothing accepted); a plain step: 2 ms. The probe's excess (4 x 0.2 ms)
    # is 4 plain steps' worth, so the pause's cost floor (80 steps per plain step of excess) stays below PAUSE
    p = sp.PROBE
    chosen = run(gov, 1, p + p + sp.PAUSE + p + 2 * sp.PAUSE, 2.2e-3, 1.0, 2e-3)
    assert chosen[:p] == [False] * p  # plain decoding timed first
    assert chosen[p : 2 * p] == [True] * p  # then speculation
    assert not any(chosen[2 * p : 2 * p + sp.PAUSE])  # lost: paused
    assert all(chosen[2 * p + sp.PAUSE : 3 * p + sp.PAUSE])  # probed again
    assert not any(chosen[3 * p + sp.PAUSE :])  # lost again: a pause twice as long
    assert gov.pauses == 2 and gov.buckets[1].pause == 4 * sp.PAUSE
    # each pause is logged with the rates it judged: 2 ms a plain step against 2.2 ms a token of speculation
    assert [(d["decision"], d["why"]) for d in gov.decisions] == [(f"pause {sp.PAUSE}", "probe")] + [
        (f"pause {2 * sp.PAUSE}", "probe")
    ]
    assert gov.decisions[0]["plain_ms"] == pytest.approx(2.0) and gov.decisions[0]["spec_ms_per_token"] == 2.2
    assert gov.buckets[1].phase == "probe_spec"  # the second pause is over: timed afresh from here
    assert gov.gain(1) is None
    run(gov, 1, sp.PROBE, 2.2e-3, 1.0, 2e-3)
    assert gov.gain(1) == pytest.approx(2e-3 / 2.2e-3) and gov.buckets[1].phase == "paused"


def test_a_dear_probe_buys_a_pause_long_enough_to_cost_at_most_its_budget():
    gov = SpecGovernor("auto")
    # a round: 5 ms for 1 token a row, a plain step 2 ms: the probe's 4 rounds cost 12 ms more than plain steps
    # would for their 4 tokens, so the pause is 12 / (PROBE_BUDGET x 2 ms) = 120 steps (> PAUSE)
    run(gov, 1, 2 * sp.PROBE, 5e-3, 1.0, 2e-3)
    b = gov.buckets[1]
    floor = round(4 * (5e-3 - 2e-3) / (sp.PROBE_BUDGET * 2e-3))
    assert b.phase == "paused" and b.left == floor > sp.PAUSE
    assert run(gov, 1, floor, 5e-3, 1.0, 2e-3) == [False] * floor  # plain for the whole pause
    assert gov.buckets[1].phase == "probe_spec"


def test_a_round_dearer_than_k_plus_1_plain_steps_stops_its_probe_at_the_second_round():
    gov = SpecGovernor("auto")
    # k = 4: a round can give at most 5 tokens a row; a round of 12 ms against plain steps of 2 ms can never pay,
    # even with every draft accepted (here all of them were: 5 tokens a row)
    chosen = run(gov, 1, 2 * sp.PROBE, 12e-3, 5.0, 2e-3, most=5)
    p = sp.PROBE
    assert chosen[:p] == [False] * p and chosen[p : p + 2] == [True, True]  # the first round is not judged
    assert not any(chosen[p + 2 :]) and gov.pauses == 1
    assert gov.decisions[-1]["why"] == "bound" and gov.decisions[-1]["round_ms"] == pytest.approx(12.0)
    b = gov.buckets[1]
    # its pause: the two rounds' excess over 10 plain steps (24 - 20 ms) at the budget
    assert b.phase == "paused" and b.left == max(sp.PAUSE, round(4e-3 / (sp.PROBE_BUDGET * 2e-3))) - (p - 2)
    # a round within the bound is probed in full
    gov2 = SpecGovernor("auto")
    assert run(gov2, 1, 2 * sp.PROBE, 9e-3, 5.0, 2e-3, most=5)[p:] == [True] * p


def test_a_winning_draft_keeps_speculating_and_retimes_plain_steps_now_and_then():
    gov = SpecGovernor("auto")
    # a round: 6 ms for 4 tokens a row; a plain step: 4 ms -> 2.7x
    chosen = run(gov, 1, 2 * sp.PROBE + sp.REFRESH + sp.PROBE + 5, 6e-3, 4.0, 4e-3)
    assert gov.pauses == 0 and gov.buckets[1].phase == "spec"
    assert gov.gain(1) == pytest.approx(4e-3 / 1.5e-3)
    plain = [
        i for i, c in enumerate(chosen) if not c
    ]  # the first probe, then one refresh after REFRESH rounds
    assert len(plain) == 2 * sp.PROBE and plain[sp.PROBE] == 2 * sp.PROBE + sp.REFRESH
    assert [(d["decision"], d["why"]) for d in gov.decisions] == [("spec", "faster")] * 2
    assert gov.decisions[0]["spec_ms_per_token"] == pytest.approx(1.5)


def test_speculation_that_starts_losing_pauses_at_once():
    gov = SpecGovernor("auto")
    run(gov, 1, 2 * sp.PROBE + 3, 6e-3, 4.0, 4e-3)  # speculating
    assert gov.buckets[1].phase == "spec"
    run(
        gov, 1, 10, 6e-3, 1.0, 4e-3
    )  # the text changed: nothing accepted any more (the rates weight recent rounds)
    assert gov.buckets[1].phase == "paused" and gov.pauses == 1
    assert gov.decisions[-1]["why"] == "slower" and gov.decisions[-1]["from"] == "spec"


def test_buckets_are_timed_apart_and_always_never_pauses():
    gov = SpecGovernor("auto")
    run(gov, 1, 4 * sp.PROBE, 6e-3, 4.0, 4e-3)  # wins at batch 1
    run(gov, 32, 4 * sp.PROBE, 9e-3, 1.5, 5e-3)  # loses at batch 32
    assert gov.wants(1) and not gov.wants(32)
    always = SpecGovernor("always")
    assert all(run(always, 1, 3 * sp.PROBE + sp.PAUSE, 5e-3, 1.0, 2e-3))
    with pytest.raises(InputError, match="speculation='sometimes': use one of auto, always"):
        SpecGovernor("sometimes")


def test_a_new_larger_bucket_inherits_a_smaller_buckets_pause():
    gov = SpecGovernor("auto")
    run(gov, 2, 2 * sp.PROBE, 5e-3, 1.0, 2e-3)  # loses at 2 rows: paused
    left = gov.buckets[2].left
    assert gov.buckets[2].phase == "paused"
    assert not gov.wants(4) and gov.buckets[4].left == left  # 4 rows, never seen: paused for what is left
    gov.wants(1)  # a smaller bucket is timed on its own: its first probe (plain steps, then rounds)
    assert gov.buckets[1].phase == "probe_plain"
    # the inherited pause ends like any other: then 4 rows are probed for themselves
    run(gov, 4, int(left), 5e-3, 1.0, 2e-3)
    assert gov.buckets[4].phase == "probe_spec"
