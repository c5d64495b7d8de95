"""When to speculate: a draft pays only while its accepted tokens outrun what its rounds cost.

A speculative round (the draft's k tokens, then the model's verify of k + 1) costs about k draft steps plus one
model step and gives 1 + (accepted drafts) tokens per row. With a draft that agrees rarely (another model, random
weights, text unlike the draft's) or a model whose step is launch-bound (a tiny one), the round costs more per
token than plain decoding: the H200 measured 0.17-0.49x of plain decoding (bench/TORCH.md). `SpecGovernor` times
both on the running workload, per batch bucket, and speculates only while a round's seconds per token are below
a plain step's:

    probe_plain (PROBE steps) -> probe_spec (PROBE rounds) -> decide
    decide: speculation faster -> spec (REFRESH rounds, then probe_plain again to refresh the plain rate)
            otherwise          -> paused (plain decoding) -> probe_spec

A probe stops early when speculation cannot pay whatever the draft's acceptance: a round that takes longer than
k + 1 plain steps (all k drafts accepted gives k + 1 tokens a row). The first round of a probe is not judged so,
since it may carry the draft's catch-up on the tokens of a pause. A pause lasts PAUSE plain steps, doubling up to
MAX_PAUSE while speculation keeps losing, and at least long enough that the probe before it cost no more than
PROBE_BUDGET of the pause's plain decoding (its excess over plain steps for the same tokens), up to MAX_COST_PAUSE:
on a model whose plain step is far cheaper than a round (a small one on a GPU: 0.08 ms against 1.2 ms) the probes
would otherwise cost more than the pauses save.

While in `spec`, a round that leaves speculation slower than plain decoding by MARGIN pauses it at once. A bucket
met for the first time while a smaller one is paused starts paused for the rest of that pause (`_at`).
Greedy output does not depend on any of this: a round's tokens are the model's own greedy tokens, as a plain
step's are (tests/runtime/test_speculative.py).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from lorafast_export.errors import InputError

SPECULATION = ("auto", "always")
PROBE = 4  # plain steps, then rounds, timed before a decision
REFRESH = 64  # rounds of speculation before the plain rate is timed again
PAUSE, MAX_PAUSE = 32, 1024  # plain steps before speculation is tried again (doubling while it loses)
PROBE_BUDGET, MAX_COST_PAUSE = 0.05, 16384  # a pause's floor: its probe's excess cost over this share of it
JUDGED_FROM = 2  # the first round of a probe that the best-case bound may stop (the first carries a catch-up)
MARGIN = 0.05  # a running speculation pauses when plain decoding is this much faster


@dataclass
class _Rate:
    """Seconds per unit (a plain step, or a token per row of a speculative round), recent calls weighted most."""

    seconds: float = 0.0
    units: float = 0.0

    def add(self, seconds: float, units: float, decay: float = 0.75) -> None:
        self.seconds = self.seconds * decay + seconds
        self.units = self.units * decay + units

    @property
    def per_unit(self) -> float | None:
        return self.seconds / self.units if self.units > 0 else None


@dataclass
class _Bucket:
    phase: str = "probe_plain"
    # rounds (probe_spec, spec) or plain steps (probe_plain, paused) until the next change of phase
    left: float = PROBE
    pause: int = PAUSE  # the next pause's doubling length
    spec: _Rate = field(default_factory=_Rate)
    plain: _Rate | None = None  # None: no plain step timed yet
    # this probe_spec's rounds: their seconds and tokens a row, summed (for the pause's cost floor), and count
    probe_s: float = 0.0
    probe_tokens: float = 0.0
    probe_rounds: int = 0


class SpecGovernor:
    """Whether the next decode of a batch bucket speculates (`wants`), from the times the engine reports
    (`record_round`, `record_plain`). policy "always": every time it can (the rounds are still recorded)."""

    def __init__(self, policy: str = "auto"):
        if policy not in SPECULATION:
            raise InputError(f"speculation={policy!r}: use one of {', '.join(SPECULATION)}.")
        self.policy = policy
        self.buckets: dict[int, _Bucket] = {}
        self.pauses = 0  # times speculation was paused (all buckets)
        # its latest decisions, for a benchmark or a log to show why it paused: bucket, decision, why, and the
        # rates it judged (ms a plain step, ms a token a row of speculation, the round's ms)
        self.decisions: deque[dict] = deque(maxlen=64)

    def _at(self, bucket: int) -> _Bucket:
        """A bucket's state. A bucket met for the first time while a smaller one is paused starts paused too,
        for what is left of that pause: a round's gain shrinks as the batch grows (a plain step's cost per row
        falls, the verify's grows), as vLLM's speculative_disable_by_batch_size also assumes, so a batch
        that drifts upward does not pay for a probe at each new bucket."""
        b = self.buckets.get(bucket)
        if b is None:
            b = self.buckets[bucket] = _Bucket()
            below = [k for k, v in self.buckets.items() if k < bucket and v.phase == "paused"]
            if below:
                lost = self.buckets[max(below)]
                b.phase, b.left, b.pause = "paused", lost.left, lost.pause
        return b

    def wants(self, bucket: int) -> bool:
        return self.policy == "always" or self._at(bucket).phase in ("probe_spec", "spec")

    def gain(self, bucket: int) -> float | None:
        """Plain seconds per token over speculative seconds per token (> 1: speculation is faster)."""
        b = self._at(bucket)
        spec, plain = b.spec.per_unit, b.plain and b.plain.per_unit
        return plain / spec if spec and plain else None

    def record_round(
        self, bucket: int, seconds: float, tokens_per_row: float, most: int | None = None
    ) -> None:
        """A speculative round took `seconds` for `tokens_per_row` tokens of each row; `most`: the tokens a row
        gets when every draft is accepted (k + 1), for the best-case bound."""
        b = self._at(bucket)
        b.spec.add(seconds, tokens_per_row)
        if self.policy == "always" or b.phase not in ("probe_spec", "spec"):
            return
        b.left -= 1
        if b.phase == "probe_spec":
            b.probe_s += seconds
            b.probe_tokens += tokens_per_row
            b.probe_rounds += 1
            step = b.plain.per_unit if b.plain else None
            if most and step and b.probe_rounds >= JUDGED_FROM and seconds > most * step:
                # even a round with every draft accepted would lose to plain steps
                self._pause(b, bucket, "bound", seconds)
                return
        g = self.gain(bucket)
        if b.phase == "spec" and g is not None and g < 1 - MARGIN:
            self._pause(b, bucket, "slower", seconds)
        elif b.left <= 0:  # a probe_spec always follows timed plain steps (a probe_plain or a pause)
            self._decide(b, bucket)

    def record_plain(self, bucket: int, seconds: float, steps: int) -> None:
        b = self._at(bucket)
        b.plain = b.plain or _Rate()
        b.plain.add(seconds, steps)
        if self.policy == "always" or b.phase not in ("probe_plain", "paused"):
            return
        b.left -= steps
        if b.left > 0:
            return
        if b.phase == "probe_plain" and b.spec.per_unit is not None:
            self._decide(b, bucket)
        else:  # the first probe's plain steps are timed, or the pause is over: time speculation afresh
            b.phase, b.left, b.spec = "probe_spec", PROBE, _Rate()
            b.probe_s, b.probe_tokens, b.probe_rounds = 0.0, 0.0, 0

    def _probe_plain(self, b: _Bucket) -> None:
        b.phase, b.left, b.plain = "probe_plain", PROBE, _Rate()

    def _decide(self, b: _Bucket, bucket: int) -> None:
        if b.phase == "spec":  # REFRESH rounds done: time plain decoding again before going on
            self._probe_plain(b)
            return
        g = self.gain(bucket)
        if g is not None and g >= 1:
            self._note(b, bucket, "spec", "faster")
            b.phase, b.left, b.pause = "spec", REFRESH, PAUSE
        else:
            self._pause(b, bucket, "probe")

    def _note(self, b: _Bucket, bucket: int, decision: str, why: str, seconds: float | None = None) -> None:
        self.decisions.append(
            {"bucket": bucket, "from": b.phase, "decision": decision, "why": why,
             "plain_ms": _ms(b.plain.per_unit if b.plain else None), "spec_ms_per_token": _ms(b.spec.per_unit),
             "round_ms": _ms(seconds), "probe_rounds": b.probe_rounds}
        )  # fmt: skip

    def _pause(self, b: _Bucket, bucket: int, why: str, seconds: float | None = None) -> None:
        length = b.pause
        step = b.plain.per_unit if b.plain else None
        if b.phase == "probe_spec" and step:  # the probe's cost over plain steps for its tokens
            excess = b.probe_s - b.probe_tokens * step
            length = max(length, min(math.ceil(excess / (PROBE_BUDGET * step)), MAX_COST_PAUSE))
        self._note(b, bucket, f"pause {length}", why, seconds)
        b.phase, b.left = "paused", length
        b.pause = min(2 * b.pause, MAX_PAUSE)
        self.pauses += 1


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1e3, 3)
