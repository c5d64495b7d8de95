"""Continuous batching over the paged cache: requests join and leave between decode steps.

Each `step()`: admit waiting requests (shortest prompt first, except that a request that has waited
more than `max_wait_ms` goes before every younger one: no starvation) while a batch row, cache blocks
and a prefill token budget allow (prefilled together in one forward with the prompts packed back to
back, so no padding goes through the linears; it also yields their first tokens), then one decode step
for every running request.
`prefill_first`: admit again (prefill after prefill) while the queue holds a request that fits, before
any decode step: the time to first token of a queue no longer waits for decode steps in between. The decode
batch is padded to a bucket size and the block tables to a power-of-two width. Compiled, the per-layer
function goes through torch.compile (one graph shared by every layer; a whole 8B-shaped step took ~80 s to
compile per shape on an H200) and on CUDA the whole step is replayed from one CUDA graph per shape
(runtime/graphs.py); so is a lone prompt's prefill of <= PREFILL_GRAPH_MAX tokens, right-padded to a
power of two (its launches, not the GPU, bound a short prompt's time to first token). When the pool runs out mid-decode the most recently admitted request is preempted:
its blocks are freed and it re-enters the queue to be recomputed from its prompt and the tokens it already
has (greedy output is unchanged by this).

Speculative decoding (`draft=`, greedy requests): a smaller model of the same vocabulary (the int4 artifact
of the same fine-tune) proposes k tokens one decode step at a time over its own paged cache; the model
verifies all k in one forward of k + 1 tokens per row through its paged cache and keeps the longest prefix
that equals its own greedy choice, plus its own next token. The output is the model's greedy output token
for token; the k/v written for rejected tokens lie past `cached` and are overwritten later.

Multi-step decoding (`decode_steps=n`, greedy rows, nothing waiting): n decode steps run back to back
with each step's argmax fed to the next on the device, and the host reads the n x rows tokens once. The
host builds the inputs of all n steps at once (one copy to the device), so the GPU no longer waits for
Python, a host-to-device copy and a `.tolist()` between tokens. n never exceeds any row's remaining
tokens; a row that meets a stop token mid-burst keeps the tokens up to it (the steps after it are wasted
work, written past `cached`). The output is that of single steps, token for token.
`overlap_bursts`: when the next burst is certain (the same rows, nobody waiting, every row with at least
two tokens to go after this burst and room for them in the pool), it is queued on the device, fed by this
burst's last tokens there, before the host reads this burst's tokens (a pinned copy and an event): the GPU
no longer idles while the host reads the tokens and builds the next inputs. A row that meets a stop token
in a burst has one more burst queued for it: that work is wasted and its tokens ignored (its k/v land in
blocks the host may free and hand out meanwhile, but before any later work on the same stream: the next
prefill overwrites them).
`overlap_rounds` (speculative decoding; the runtime option is on by default, the Engine argument off): when the next speculative round is certain (the
same rows, nobody waiting, greedy rows with room for two more rounds in the pool and in their token budgets), it
is queued on the device before the host reads this round's tokens, its inputs derived there from this round's
outputs (each row's accepted count, its next token and the draft's catch-up tokens, positions and slots through
the block tables): the GPU no longer idles while the host reads a round and builds the next. A row that meets a
stop token has the queued round's tokens ignored, as a burst's.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from lorafast_export.errors import InputError
from lorafast_export.runtime.graphs import GraphRunner, on_device
from lorafast_export.runtime.kv_cache import PAD_BLOCK, OutOfBlocks, PagedKVCache
from lorafast_export.runtime.paged import VERIFY_MAX, pack_segments
from lorafast_export.runtime.speculation import SpecGovernor

ADMIT_ORDERS = ("arrival", "shortest")  # which waiting request is prefilled first
MAX_WAIT_MS = 500.0  # shortest first: a request that waited longer is admitted before any younger one
PREFILL_GRAPH_MAX = 512  # a lone prompt up to this long is prefilled from a CUDA graph (padded)


@dataclass
class Request:
    id: int
    prompt: list[int]
    max_new_tokens: int
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    stop_ids: frozenset[int] = frozenset()
    output: list[int] = field(default_factory=list)
    cached: int = 0  # tokens whose k/v are in the cache
    t_added: float = 0.0
    t_first: float | None = None
    t_done: float | None = None
    draft_cached: int = 0  # tokens whose k/v are in the draft's cache (speculative decoding)
    t_chunked: float = 0.0  # when its first prefill chunk was launched (chunked prefill)

    @property
    def done(self) -> bool:
        return len(self.output) >= self.max_new_tokens or (
            bool(self.output) and self.output[-1] in self.stop_ids
        )


@dataclass
class EngineStats:
    prefill_tokens: int = 0
    prefill_s: float = 0.0
    decode_steps: int = 0
    decode_tokens: int = 0
    decode_s: float = 0.0
    preemptions: int = 0
    prefill_chunks: int = 0  # chunks of prompts prefilled in chunks (prefill_chunk)
    spec_rounds: int = 0
    drafted: int = 0  # draft tokens proposed
    accepted: int = 0  # draft tokens the model agreed with
    bursts: int = 0  # multi-step decodes (decode_steps > 1), each of several decode_steps
    queued_bursts: int = 0  # bursts queued before the host read the previous one's tokens (overlap)
    queued_rounds: int = 0  # speculative rounds queued before the host read the last one's (overlap_rounds)
    prefills: list = field(default_factory=list)  # (start s, requests, prompt tokens, seconds) per prefill

    @property
    def acceptance(self) -> float | None:
        return self.accepted / self.drafted if self.drafted else None


def _pack_lens(budget: int, longest: int) -> list[int]:
    """Prompt lengths of a packed prefill of about the token budget (each <= longest): an odd count of odd
    lengths (>= 3) whose total, count and longest differ. The prefill is compiled dynamic in its sizes; dynamo
    specialises a size of 0 or 1 and unifies sizes that happen to be equal ("duck sizing"): a total of 4096
    tokens beside a hidden size of 4096 compiled a graph for that total only, and the first real prefill
    compiled again (3.2 s). Model dimensions are even. [] when the budget never packs two prompts."""
    for total in range(budget - (budget % 2 == 0), budget // 2, -2):
        cap = min(longest, total // 3)  # three prompts at least
        for odd in range(cap - (cap % 2 == 0), max(cap // 2, 2), -2):
            lens = [odd] * (total // odd) + ([total % odd] if total % odd else [])
            if (
                len(lens) % 2
                and min(lens) >= 3
                and all(x % 2 for x in lens)
                and len({total, len(lens), odd}) == 3
            ):
                return lens
    return []


def _grid_lens(budget: int, longest: int, rows: int) -> list[int]:
    """Prompt lengths of the packed prefill with the largest attention grid (prompts x longest of them, what
    packed_attention pads to) within the token budget and the batch rows: one long prompt and short ones, sizes
    as `_pack_lens` picks them (odd, >= 3, total, count and longest distinct); [] when none fits."""
    best: list[int] = []
    for b in range(3, rows + 1, 2):
        top = min(longest, budget - 3 * (b - 1))
        top -= top % 2 == 0
        if top > 3 and len({top + 3 * (b - 1), b, top}) == 3 and b * top > len(best) * max(best, default=0):
            best = [top] + [3] * (b - 1)
    return best


GEMM_ROWS_ALL, GEMM_ROWS_STEP = 64, 8  # Engine._warm_prefill_gemms: every row count to 64, then every 8th


def _gemm_rows(budget: int) -> list[int]:
    """The row counts the prefill GEMMs are warmed at: all up to GEMM_ROWS_ALL, then every GEMM_ROWS_STEP-th up
    to the budget, and the budget. cuBLAS's choice of kernel changes with the row count in ranges (tiles, waves
    over the SMs) wider than the step at large counts; at small ones it is finer, so every count is run."""
    rows = set(range(1, min(budget, GEMM_ROWS_ALL) + 1))
    rows.update(range(GEMM_ROWS_ALL + GEMM_ROWS_STEP, budget + 1, GEMM_ROWS_STEP))
    rows.add(budget)
    return sorted(rows)


def _bucket(n: int, buckets: tuple[int, ...]) -> int:
    return next((b for b in buckets if b >= n), n)


def _pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


class Engine:
    """Owns the request queue and the cache bookkeeping; `model` runs prefill and the decode step."""

    def __init__(
        self,
        model,
        cache: PagedKVCache,
        *,
        max_batch: int,
        max_seq_len: int,
        batch_buckets: tuple[int, ...] = (1, 2, 4, 8, 16, 32),
        compile: bool = False,
        fixed_width: bool = False,
        device: str | torch.device = "cpu",
        seed: int = 0,
        draft=None,
        draft_cache: PagedKVCache | None = None,
        spec_k: int = 4,
        prefill_budget: int = 4096,
        prefill_chunk: int = 0,
        decode_steps: int = 1,
        admit_order: str = "shortest",
        max_wait_ms: float = MAX_WAIT_MS,
        prefill_first: bool = True,
        overlap_bursts: bool = True,
        overlap_rounds: bool = False,
        clock: Callable[[], float] = time.perf_counter,
        speculation: str = "always",
        argmax: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        self.model, self.cache, self.device = model, cache, torch.device(device)
        # logits [..., V] -> their greedy tokens [...]: torch's argmax, or one with the same values (option
        # triton_argmax: runtime/triton_argmax.py); every greedy pick of this engine uses it
        self.argmax = argmax or _last_argmax
        self.max_batch, self.max_seq_len = max_batch, max_seq_len
        self.buckets = tuple(sorted({b for b in batch_buckets if b < max_batch} | {max_batch}))
        self.max_blocks = cache.blocks_for(max_seq_len)
        self.fixed_width = fixed_width  # flex attention skips unused blocks: one width, fewer graphs
        # the graphs a model's compiled layer can need: its step and its verify (a draft's: its step and its
        # catch-up) at each batch bucket and table width, so that dynamo never meets its recompile limit, which
        # fails a fullgraph compile: from 64 (row, kv head) pairs attention.decode_plan's powers of two specialize
        # the graph to the width, and an 8B runtime at the default buckets needed more than dynamo's 8
        self.graph_room = 2 * len(self.buckets) * len(self.widths()) + 8
        self.compiled = compile
        self.cuda_graphs = compile and self.device.type == "cuda"
        if (draft is None) != (draft_cache is None) or spec_k < 1:
            raise InputError("speculative decoding needs a draft model, its cache and spec_k >= 1.")
        self.draft, self.draft_cache, self.spec_k = draft, draft_cache, spec_k
        # auto: speculate while a round's seconds per token beat a plain step's (runtime/speculation.py)
        self.governor = SpecGovernor(speculation)
        self.timer = time.perf_counter  # what the governor's times are read from (a test can replace it)
        self.prefill_budget = prefill_budget  # padded prompt tokens prefilled together (1 = one at a time)
        if prefill_chunk < 0 or (prefill_chunk and getattr(model, "chunk", None) is None):
            raise InputError(
                f"prefill_chunk={prefill_chunk}: use 0 (off) or a positive token count, on a model with a "
                "chunk forward (not the AOT packages)."
            )
        # a prompt longer than this is prefilled in chunks of it, one a step, decode steps between (0 = off)
        self.prefill_chunk = prefill_chunk
        self.chunking: list[Request] = []  # admitted, prompt partly in the cache (the first one goes on)
        self._chunk_step = False  # this step runs a chunk (step sets it; _burst_len reads it)
        if decode_steps < 1:
            raise InputError(f"decode_steps={decode_steps}: use a positive integer (1 = one step at a time).")
        self.decode_steps = decode_steps
        self.overlap_bursts = overlap_bursts  # queue a certain next burst before reading this one's tokens
        self._queued: _Burst | None = None  # a burst on the device whose tokens the host has not read
        self.overlap_rounds = overlap_rounds  # queue a certain next speculative round before reading this one
        self._round: _Round | None = None  # a speculative round on the device, its tokens not yet read
        if admit_order not in ADMIT_ORDERS:
            raise InputError(f"admit_order={admit_order!r}: use one of {', '.join(ADMIT_ORDERS)}.")
        self.admit_order = admit_order
        if not max_wait_ms >= 0:
            raise InputError(f"max_wait_ms={max_wait_ms}: use a number >= 0 (0 = arrival order).")
        self.max_wait_ms = max_wait_ms
        self.clock = clock  # arrival, aging and first/last token times (a test can step it by hand)
        self.prefill_first = prefill_first  # no decode step while a waiting request can be admitted
        self.decode_fn, self.extend_fn = model, getattr(model, "extend", None)
        # the decode step and its argmax: token ids [rows] on the device
        self.greedy_fn = _Greedy(model, self.argmax)
        self.draft_extend = getattr(draft, "extend", None)
        # a draft step and its argmax
        self.draft_greedy = None if draft is None else _Greedy(draft, self.argmax)
        if compile:
            for m in (model, draft):
                if m is not None:
                    m.compile_layers()
        self.prefill_graph = None  # one prompt of <= PREFILL_GRAPH_MAX tokens, padded to a power of two
        if self.cuda_graphs:
            self.prefill_graph = GraphRunner(_PaddedPrefill(model))
            self.decode_fn, self.extend_fn = GraphRunner(model), GraphRunner(model.extend)
            self.greedy_fn = GraphRunner(self.greedy_fn)
            if draft is not None:
                self.draft_greedy, self.draft_extend = (
                    GraphRunner(self.draft_greedy),
                    GraphRunner(draft.extend),
                )
        self.warm_up_s = None  # seconds warm_up took, once run
        self._pending, self._landed = 0, 0.0  # rows of queued prefills; when the last one landed
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.stats = EngineStats()
        self._ids = itertools.count()
        self._gen = torch.Generator(device=self.device).manual_seed(seed)

    # ---------------------------------------------------------------------------------------- requests
    def add(
        self,
        prompt: list[int],
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop_ids: tuple[int, ...] = (),
    ) -> Request:
        if not prompt:
            raise InputError("a prompt needs at least one token.")
        if max_new_tokens < 1:
            raise InputError(f"max_new_tokens={max_new_tokens}: ask for at least 1.")
        if len(prompt) + max_new_tokens > self.max_seq_len:
            raise InputError(
                f"prompt ({len(prompt)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                f"runtime's max_seq_len={self.max_seq_len}; raise the max_seq_len option."
            )
        if self.cache.blocks_for(len(prompt) + max_new_tokens) > self.cache.allocator.num_blocks:
            raise InputError(
                f"a request of {len(prompt) + max_new_tokens} tokens cannot fit in the KV pool "
                f"({self.cache.allocator.num_blocks} blocks of {self.cache.block_size}); raise "
                "cache_tokens/cache_gib."
            )
        r = Request(
            next(self._ids),
            list(prompt),
            max_new_tokens,
            temperature,
            top_p,
            frozenset(stop_ids),
            t_added=self.clock(),
        )
        self.waiting.append(r)
        return r

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.chunking)

    @on_device
    def generate_batch(
        self, prompts: list[list[int]], max_new_tokens: int | list[int], **sampling
    ) -> list[list[int]]:
        """Run every prompt to completion through continuous batching; new tokens per prompt, in order."""
        news = max_new_tokens if isinstance(max_new_tokens, list) else [max_new_tokens] * len(prompts)
        reqs = [self.add(p, n, **sampling) for p, n in zip(prompts, news, strict=True)]
        while self.has_work:
            self.step()
        return [r.output for r in reqs]

    # -------------------------------------------------------------------------------------------- step
    @on_device
    def step(self) -> list[Request]:
        """Admit (and prefill) what fits, then decode one token for every running request; returns finished.
        prefill_first: prefill again while a waiting request fits; each prefill is queued on the device
        before the host waits for the previous one's first tokens, so the GPU does not idle between them."""
        finished, pending = [], None if self.chunking else self._launch_prefill()
        while pending is not None:
            nxt = self._launch_prefill() if self.prefill_first and not self.chunking else None
            finished += self._land_prefill(pending)
            pending = nxt
        # a chunk's step decodes one token (_burst_len), also the step whose chunk was its prompt's last
        self._chunk_step = bool(self.chunking)
        if self._chunk_step:  # one chunk a step: the running requests decode between chunks
            finished += self._next_chunk()
        if self.running:
            finished += self._timed_decode()
        return finished

    def _timed_decode(self) -> list[Request]:
        """_decode, its time reported to the speculation governor (with a draft): a speculative round as
        seconds per token of each row, plain steps (a burst's included) as seconds per step."""
        if self.draft is None:
            return self._decode()
        st, rows = self.stats, len(self.running)
        bucket = _bucket(rows, self.buckets)
        # the draft's prefills are paid once a request, not a round: kept out of the governor's time
        if (
            self._queued is None
            and self._round is None
            and self._can_speculate()
            and self._draft_prefills(self.running)
        ):
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
        before, t0 = (st.spec_rounds, st.decode_steps, st.decode_tokens), self.timer()
        finished = self._decode()
        seconds = self.timer() - t0
        rounds, steps, tokens = (
            a - b for a, b in zip((st.spec_rounds, st.decode_steps, st.decode_tokens), before, strict=True)
        )
        if rounds:
            self.governor.record_round(bucket, seconds, tokens / rows, most=self.spec_k + 1)
        elif steps:
            self.governor.record_plain(bucket, seconds, steps)
        return finished

    def _finish(self, r: Request) -> None:
        r.t_done = self.clock()
        self.cache.free(r.id)
        if self.draft_cache is not None:
            self.draft_cache.free(r.id)

    def _order(self) -> list[Request]:
        """Waiting requests in admission order. "shortest": the requests that waited longer than
        max_wait_ms first, in arrival order, then the others shortest prompt first (ties: arrival). Once a
        request has aged, only requests that arrived before it can be admitted ahead of it, and
        _launch_prefill stops at the first request that does not fit: no stream of short prompts can
        starve a long one for more than max_wait_ms plus the time to serve the requests older than it."""
        order = list(self.waiting)  # arrival order (a preempted request re-enters at the front)
        if self.admit_order == "shortest":
            aged = self.clock() - self.max_wait_ms / 1e3

            def key(r: Request) -> tuple:
                return (0, r.t_added) if r.t_added < aged else (1, len(r.prompt) + len(r.output))

            order.sort(key=key)  # stable: ties keep arrival order
        return order

    def _launch_prefill(self) -> _Prefill | None:
        """Admit waiting requests in _order (shortest first, aged requests before all others) while a
        batch row, cache blocks and the prefill token budget allow, and queue their prefill (one packed
        forward) and first tokens on the device; None if nobody can be admitted. The first request in
        order that does not fit stops the admission: nobody overtakes it."""
        batch: list[tuple[Request, list[int]]] = []
        total, busy = 0, len(self.running) + self._pending + len(self.chunking)
        for r in self._order():
            if busy + len(batch) >= self.max_batch:
                break
            tokens = r.prompt + r.output  # after a preemption: recompute what it already has
            if self.prefill_chunk and len(tokens) > self.prefill_chunk:
                if batch or (busy and not self.cache.can_fit(len(tokens) + 1)):
                    break  # the batch before it first; or wait for running requests to free room
                self.waiting.remove(r)
                self.cache.reserve(r.id, len(tokens) + 1)
                r.cached, r.t_chunked = 0, time.perf_counter()
                self.chunking.append(r)  # its chunks run from step(), one a step
                return None
            if batch and total + len(tokens) > self.prefill_budget:
                break
            if not self.cache.can_fit(len(tokens) + 1) and (busy or batch):
                break  # wait for running requests to finish
            self.waiting.remove(r)
            self.cache.reserve(r.id, len(tokens) + 1)
            batch.append((r, tokens))
            total += len(tokens)
        if not batch:
            return None
        t0 = time.perf_counter()
        firsts = _to_host(self._prefill(batch))
        self._pending += len(batch)
        return _Prefill(batch, total, t0, firsts)

    def _next_chunk(self) -> list[Request]:
        """The next chunk of prefill_chunk tokens of the request being prefilled in chunks: the first from
        position 0 through the model's prefill, each later one on top of the cached prefix (model.chunk);
        after the last, its first token, and it joins the running batch (its prefill time in the stats is
        from its first chunk, so it includes the decode steps between its chunks)."""
        r = self.chunking[0]
        tokens = r.prompt + r.output
        start, end = r.cached, min(r.cached + self.prefill_chunk, len(tokens))
        if len(tokens) - end == 1:  # no chunk of one token after this one: dynamo compiles a graph for size 1
            end += 1
        ids = torch.tensor([tokens[start:end]], device=self.device)
        slots = self.cache.slots(r.id, 0, end).to(self.device, non_blocking=True)
        if start == 0:
            logits = self.model.prefill(ids, slots)
        else:
            logits = self.model.chunk(ids, start, slots)
        r.cached = end
        self.stats.prefill_chunks += 1
        if end < len(tokens):
            return []
        self.chunking.pop(0)
        self._pending += 1
        return self._land_prefill(
            _Prefill([(r, tokens)], len(tokens), r.t_chunked, _to_host(self._pick(logits, [r])))
        )

    def _land_prefill(self, p: _Prefill) -> list[Request]:
        """Wait for a queued prefill's first tokens; its requests join the running batch."""
        firsts = p.firsts()
        now = time.perf_counter()
        self._pending -= len(p.batch)
        self.stats.prefill_tokens += p.tokens
        self.stats.prefill_s += now - max(p.t0, self._landed)  # queued prefills overlap: count once
        self._landed = now
        self.stats.prefills.append((p.t0, len(p.batch), p.tokens, now - p.t0))
        finished = []
        for (r, tokens), first in zip(p.batch, firsts, strict=True):
            r.draft_cached = 0  # the draft prefills it at the first round that wants it (_draft_prefills)
            r.output.append(first)
            r.cached = len(tokens)
            if r.t_first is None:
                r.t_first = self.clock()
            if r.done:
                self._finish(r)
                finished.append(r)
            else:
                self.running.append(r)
        return finished

    def _prefill(self, batch: list[tuple[Request, list[int]]]) -> torch.Tensor:
        """The prompts packed back to back in one forward (no padding through the linears; the attention
        keeps each prompt to itself: runtime/attention.py's packed_attention) → first tokens, on the device."""
        if len(batch) == 1 and self.prefill_graph is not None and len(batch[0][1]) <= PREFILL_GRAPH_MAX:
            return self._padded_prefill(*batch[0])
        if len(batch) == 1:  # the model's own prefill (the AOT package takes one row)
            r, tokens = batch[0]
            ids = torch.tensor([tokens], device=self.device)
            logits = self.model.prefill(ids, self.cache.slots(r.id, 0, len(tokens)).to(self.device))
            return self._pick(logits, [r])
        return self._pick(self._packed(self.model, self.cache, batch), [r for r, _ in batch])

    def _packed(self, model, cache: PagedKVCache, batch: list[tuple[Request, list[int]]]) -> torch.Tensor:
        """One forward of `model` over several requests' tokens packed back to back, k/v written at their slots
        of `cache` from position 0 → logits [len(batch), V] of each one's last token."""
        lens = [len(t) for _, t in batch]
        ids = torch.tensor([[t for _, tokens in batch for t in tokens]])
        slots = torch.cat([cache.slots(r.id, 0, len(tokens)) for r, tokens in batch])
        last = torch.tensor(lens).cumsum(0) - 1
        ids, slots, last, *segs = (
            t.to(self.device, non_blocking=True) for t in (ids, slots, last, *pack_segments(lens))
        )
        return model.prefill(ids, slots, last_index=last, segments=tuple(segs))

    def _padded_prefill(self, r: Request, tokens: list[int]) -> torch.Tensor:
        """One prompt right-padded to a power of two (>= 16), replayed from that length's CUDA graph: a
        short prompt's prefill is bound by the host's launches (about 25 ms for the 8B's 128 tokens, eager
        or compiled), not by the GPU. The padding comes after every real token (causal attention keeps it
        out of them) and writes its k/v to the pad block."""
        n = len(tokens)
        t = max(16, _pow2(n))
        ids = torch.zeros(1, t, dtype=torch.long)
        ids[0, :n] = torch.tensor(tokens)
        slots = torch.full((t,), PAD_BLOCK * self.cache.block_size, dtype=torch.long)
        slots[:n] = self.cache.slots(r.id, 0, n)
        last = torch.tensor([n - 1])
        logits = self.prefill_graph(*(x.to(self.device, non_blocking=True) for x in (ids, slots, last)))
        return self._pick(logits, [r])

    def _reserve_next(self) -> None:
        """Room for one more token in every running sequence, preempting the newest when the pool is full."""
        i = 0
        while i < len(self.running):
            r = self.running[i]
            try:
                self.cache.reserve(r.id, r.cached + 1)
                i += 1
            except OutOfBlocks:
                victim = self.running.pop()
                self.cache.free(victim.id)
                if self.draft_cache is not None:
                    self.draft_cache.free(victim.id)
                self.waiting.appendleft(victim)
                self.stats.preemptions += 1

    def _decode(self) -> list[Request]:
        if self._queued is not None:  # queued by the previous burst: land it (and maybe queue the next)
            return self._land_burst(self._queued)
        if self._round is not None:  # queued by the previous round: land it (and maybe queue the next)
            return self._land_round(self._round)
        if self._can_speculate():
            return self._speculate()
        n = self._burst_len()
        if n > 1:
            return self._burst(n)
        self._reserve_next()
        reqs = self.running
        if not reqs:
            return []
        t0 = time.perf_counter()
        if any(r.temperature > 0 for r in reqs):
            tokens = self._sample(self._run_decode(reqs), reqs)
        else:  # the step and its argmax in one graph, the one a burst replays (warm_up captured it)
            tokens = self._run_greedy(reqs)
        self.stats.decode_s += time.perf_counter() - t0
        self.stats.decode_steps += 1
        self.stats.decode_tokens += len(reqs)
        finished = []
        for r, t in zip(reqs, tokens, strict=True):
            r.cached += 1
            r.output.append(t)
            if r.done:
                self._finish(r)
                finished.append(r)
        self.running = [r for r in reqs if not r.done]
        return finished

    def _burst_len(self) -> int:
        """Steps the next multi-step burst may take: 1 (a plain step) unless every row is greedy, nobody
        waits to be admitted, no chunk ran in this step (the step of a prompt's last chunk then returns its
        first token without waiting for a burst of every row), no draft speculates whenever it can (speculation
        "always"), and every row has room for the whole burst in the pool."""
        if (
            self.decode_steps < 2
            or self.waiting
            or self._chunk_step
            or (self.draft is not None and self.governor.policy == "always")
        ):
            return 1
        if any(r.temperature > 0 for r in self.running):
            return 1
        n = min(self.decode_steps, *(r.max_new_tokens - len(r.output) for r in self.running))
        if n < 2:
            return 1
        try:
            for r in self.running:
                self.cache.reserve(r.id, r.cached + n)
        except OutOfBlocks:
            return 1  # a plain step preempts if it must
        return n

    def _burst(self, n: int) -> list[Request]:
        """n greedy decode steps chained on the device (blocks already reserved); one read of the tokens."""
        return self._land_burst(self._queue_burst(self.running, n, 0, None))

    @torch.no_grad()
    def _queue_burst(self, reqs: list[Request], n: int, ahead: int, tok) -> _Burst:
        """Queue n chained greedy steps of reqs on the device, from `ahead` tokens past each row's cached
        (a burst queued behind another), fed by tok (that burst's last tokens, on the device) or by each
        row's last output token; start copying the tokens to the host."""
        t0 = time.perf_counter()
        rows = _bucket(len(reqs), self.buckets)
        width = self._width(self.cache, reqs)
        pos = torch.zeros(n, rows, dtype=torch.long)
        slots = torch.full((n, rows), PAD_BLOCK * self.cache.block_size, dtype=torch.long)
        for i, r in enumerate(reqs):
            start = r.cached + ahead
            pos[:, i] = torch.arange(start, start + n)
            slots[:, i] = self.cache.slots(r.id, start, start + n)
        if tok is None:
            tok = torch.zeros(rows, dtype=torch.long)
            tok[: len(reqs)] = torch.tensor([r.output[-1] for r in reqs])
            tok = tok.to(self.device, non_blocking=True)
        tables = self.cache.block_table([r.id for r in reqs], width, rows)
        pos, slots, tables = (t.to(self.device, non_blocking=True) for t in (pos, slots, tables))
        seq_lens = pos + 1  # padded rows: position 0, one slot of the pad block
        out = torch.empty(n, rows, dtype=torch.long, device=self.device)
        with _recompile_room(self.graph_room):
            for j in range(n):
                tok = out[j].copy_(self.greedy_fn(tok, pos[j], tables, seq_lens[j], slots[j]))
        self.stats.decode_s += time.perf_counter() - t0
        return _Burst(list(reqs), n, out, _to_host(out[:, : len(reqs)].T.contiguous()))

    def _queue_next(self, b: _Burst) -> _Burst | None:
        """The burst after b, queued now if it is certain: overlap on, the same rows running, nobody
        waiting, no speculative round due, every row with >= 2 tokens to go after b and room for them in the
        pool."""
        if not self.overlap_bursts or self.waiting or self.chunking or len(self.running) != len(b.reqs):
            return None
        if self.draft is not None and self.governor.wants(_bucket(len(b.reqs), self.buckets)):
            return None  # a paused draft's pause is over: the next decode is a speculative round
        n = min(self.decode_steps, *(r.max_new_tokens - len(r.output) - b.n for r in b.reqs))
        if n < 2:
            return None
        try:
            for r in b.reqs:
                self.cache.reserve(r.id, r.cached + b.n + n)
        except OutOfBlocks:
            return None  # blocks reserved for some rows stay theirs: freed with the row
        self.stats.queued_bursts += 1
        return self._queue_burst(b.reqs, n, b.n, b.out[b.n - 1])

    def _land_burst(self, b: _Burst) -> list[Request]:
        """Read a queued burst's tokens (queueing the next burst first when it is certain); a row that
        finished before (a stop token in the previous burst) ignores them."""
        self._queued = self._queue_next(b)
        t0 = time.perf_counter()
        made = b.tokens()
        self.stats.decode_s += time.perf_counter() - t0
        self.stats.decode_steps += b.n
        self.stats.bursts += 1
        finished = []
        for r, toks in zip(b.reqs, made, strict=True):
            if r.t_done is not None:
                continue
            for t in toks:
                r.output.append(t)
                r.cached += 1
                self.stats.decode_tokens += 1
                if r.done:
                    self._finish(r)
                    finished.append(r)
                    break
        self.running = [r for r in self.running if not r.done]
        if self._queued is not None and all(r.done for r in self._queued.reqs):
            self._queued = None  # every row stopped in this burst: the queued one's tokens are not needed
        return finished

    def decode_inputs(self, reqs: list[Request]) -> tuple[torch.Tensor, ...]:
        """(tokens, positions, block_tables, seq_lens, slots) padded to the batch bucket and table width."""
        rows = _bucket(len(reqs), self.buckets)
        width = self._width(self.cache, reqs)
        tokens = torch.zeros(rows, dtype=torch.long)
        positions = torch.zeros(rows, dtype=torch.long)
        seq_lens = torch.ones(rows, dtype=torch.long)  # padded rows attend to one slot of the pad block
        slots = torch.full((rows,), PAD_BLOCK * self.cache.block_size, dtype=torch.long)
        for i, r in enumerate(reqs):
            tokens[i], positions[i], seq_lens[i] = r.output[-1], r.cached, r.cached + 1
            slots[i] = self.cache.slots(r.id, r.cached, r.cached + 1)[0]
        tables = self.cache.block_table([r.id for r in reqs], width, rows)
        return tuple(
            t.to(self.device, non_blocking=True) for t in (tokens, positions, tables, seq_lens, slots)
        )

    def _width(self, cache: PagedKVCache, reqs: list[Request]) -> int:
        used = max(len(cache.tables[r.id]) for r in reqs)
        return self.max_blocks if self.fixed_width else min(max(2, _pow2(used)), self.max_blocks)

    @torch.no_grad()
    def _run_decode(self, reqs: list[Request]) -> torch.Tensor:
        inputs = self.decode_inputs(reqs)
        with _recompile_room(self.graph_room):  # per-layer graphs: one a (bucket, width) at most
            return self.decode_fn(*inputs)[: len(reqs)]

    @torch.no_grad()
    def _run_greedy(self, reqs: list[Request]) -> list[int]:
        inputs = self.decode_inputs(reqs)
        with _recompile_room(self.graph_room):
            return self.greedy_fn(*inputs)[: len(reqs)].tolist()

    # ------------------------------------------------------------------------------------------- warm-up
    def widths(self) -> list[int]:
        """Every block-table width a step can pad to (`_width`)."""
        if self.fixed_width:
            return [self.max_blocks]
        return sorted({min(max(2, _pow2(u)), self.max_blocks) for u in range(1, self.max_blocks + 1)})

    def prefill_graph_lengths(self) -> list[int]:
        """Every padded length of a lone prompt's graphed prefill (`_padded_prefill`)."""
        longest = min(PREFILL_GRAPH_MAX, self.max_seq_len - 1)  # a prompt leaves room for one new token
        return sorted({max(16, _pow2(n)) for n in range(1, longest + 1)})

    @torch.no_grad()
    @on_device
    def warm_up(self) -> int:
        """Run every shape a greedy workload can give a step once, on pad-block inputs, before any request:
        each batch bucket x table width of the decode step (and with a draft: its catch-up, its steps and the
        verify), each padded length of a lone prompt's prefill, two packed prefills (the most tokens, the largest
        padded attention grid; the draft's too) and an ungraphed one of the longest prompt (and the draft's, and
        its ungraphed catch-ups of more than 2 tokens), with prefill_chunk two later chunks (_warm_chunks), and the
        head at every row count from 1 to max_batch (not
        counted in the calls returned: cuBLAS's first call at a new count cost ~50 ms on the host), and on CUDA
        the prefill's GEMMs at their row counts (_warm_prefill_gemms, not counted either). Compiled,
        dynamo compiles its graphs here (batch 1 first, so that its graph stays static in the batch; the next
        width and the next bucket make those dimensions dynamic); on CUDA each shape's graph is captured here.
        Without it, a server compiles and captures while requests wait: the first pass of the mixed workload had
        its median time to first token doubled (bench/TORCH.md, session 14). Every write goes to the pad block.
        A sampled row (temperature > 0) steps through `decode_fn`, which is not warmed. Returns the calls run."""
        dev, calls, t0 = self.device, 0, time.perf_counter()

        def pad(cache: PagedKVCache, *shape: int) -> torch.Tensor:
            return torch.full(shape, PAD_BLOCK * cache.block_size, dtype=torch.long, device=dev)

        with _recompile_room(self.graph_room):
            for rows in self.buckets:
                for width in self.widths():
                    tables = torch.full((rows, width), PAD_BLOCK, dtype=torch.int32, device=dev)
                    zero = torch.zeros(rows, dtype=torch.long, device=dev)
                    self.greedy_fn(zero, zero, tables, zero + 1, pad(self.cache, rows))
                    calls += 1
                    if self.draft is None:
                        continue
                    dc, k = self.draft_cache, self.spec_k
                    self.draft_greedy(zero, zero, tables, zero + 1, pad(dc, rows))
                    for s, fn, cache in (
                        (1, self.draft_extend, dc),
                        (2, self.draft_extend, dc),
                        (k + 1, self.extend_fn, self.cache),
                    ):
                        tok = torch.zeros(rows, s, dtype=torch.long, device=dev)
                        pos = torch.arange(s, device=dev).repeat(rows, 1)
                        fn(tok, pos, tables, pad(cache, rows * s))
                    calls += 4
            if self.prefill_graph is not None:
                for t in self.prefill_graph_lengths():
                    ids = torch.zeros(1, t, dtype=torch.long, device=dev)
                    self.prefill_graph(ids, pad(self.cache, t), torch.tensor([t - 1], device=dev))
                    calls += 1
            # the largest prefills a workload can ask for, so that their memory is in the allocator's cache too:
            # the most tokens (the linears), and the largest padded attention grid (rows x longest prompt)
            longest = self.max_seq_len - 1
            for lens in (
                _pack_lens(self.prefill_budget, longest),
                _grid_lens(self.prefill_budget, longest, self.max_batch),
            ):
                if lens:
                    segs = tuple(t.to(dev) for t in pack_segments(lens))
                    ids = torch.zeros(1, sum(lens), dtype=torch.long, device=dev)
                    last = torch.tensor(lens, device=dev).cumsum(0) - 1
                    self.model.prefill(ids, pad(self.cache, sum(lens)), last_index=last, segments=segs)
                    calls += 1
                    if self.draft is not None:  # the draft prefills the rows of a round packed, too
                        self.draft.prefill(
                            ids, pad(self.draft_cache, sum(lens)), last_index=last, segments=segs
                        )
                        calls += 1
            # a packed prefill's head reads one row per prompt, and cuBLAS picks the head's kernel by that row
            # count: its first call at a new count cost ~50 ms on the host (the 8B head on an H200, session 17)
            dec = getattr(self.model, "dec", None)
            if dec is not None:
                x = dec.embed(torch.zeros(1, self.max_batch, dtype=torch.long, device=dev))[0]
                for m in range(1, self.max_batch + 1):
                    dec.logits(x[:m]).float()
                if dev.type == "cuda":
                    self._warm_prefill_gemms(dec, x.dtype)
            longest -= longest % 2 == 0  # odd, like the packed sizes above
            ids = torch.zeros(1, longest, dtype=torch.long, device=dev)
            self.model.prefill(ids, pad(self.cache, longest))
            calls += 1
            calls += self._warm_chunks(pad)
            if self.draft is not None:
                self.draft.prefill(ids, pad(self.draft_cache, longest))
                calls += 1
                # a draft's catch-up of more than 2 tokens (after plain steps) runs ungraphed: its lengths up to
                # VERIFY_MAX and beyond (two branches of the attention), one row (a size dynamo specialises) and
                # more, so that dynamo's compiles happen here
                for rows in self.buckets[:2]:
                    tables = torch.full((rows, self.widths()[0]), PAD_BLOCK, dtype=torch.int32, device=dev)
                    for s in (3, VERIFY_MAX + 1):
                        tok = torch.zeros(rows, s, dtype=torch.long, device=dev)
                        pos = torch.arange(s, device=dev).repeat(rows, 1)
                        self.draft.extend(tok, pos, tables, pad(self.draft_cache, rows * s))
                        calls += 1
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        self.warm_up_s = time.perf_counter() - t0
        return calls

    def _warm_chunks(self, pad) -> int:
        """With prefill_chunk: later chunks on pad slots, so that dynamo compiles the chunk layer here and no
        request waits for it: its length and prefix all distinct (one graph dynamic in both; equal sizes would
        share a symbol), then a shorter one. No chunk of one token (a size dynamo specialises: a second graph)
        runs: _next_chunk gives a lone last token to the chunk before it. Returns the calls run."""
        c = min(self.prefill_chunk, (self.max_seq_len - 2) // 2)
        if not self.prefill_chunk or c < 3 or self.max_seq_len - 1 <= self.prefill_chunk:
            return 0  # off, or no prompt can be longer than a chunk (one leaves room for a new token)
        ids = torch.zeros(1, c, dtype=torch.long, device=self.device)
        for start, s in ((c + 1, c), (c + 2, c - 1)):
            self.model.chunk(ids[:, :s], start, pad(self.cache, start + s))
        return 2

    def _warm_prefill_gemms(self, dec, dtype: torch.dtype) -> None:
        """A packed prefill runs each linear as one GEMM over all its tokens, and cuBLAS picks the kernel by that
        row count; the first launch of a kernel the process has not used loads its module on the host (CUDA's
        lazy loading). On the 8B shape that put ~15 ms into the first pass's first prefill (bench/TORCH.md,
        session 18; CUDA_MODULE_LOADING=EAGER removed most of it). So one layer of each distinct set of linear
        shapes runs at every row count `_gemm_rows` lists, on zeros."""
        seen = set()
        for layer in dec.model.layers:
            lins = [m for m in layer.modules() if hasattr(m, "in_features") and not any(m.children())]
            key = tuple((type(m).__name__, m.in_features, m.out_features) for m in lins)
            if key in seen:
                continue
            seen.add(key)
            for k in sorted({m.in_features for m in lins}):
                x = torch.zeros(1, self.prefill_budget, k, dtype=dtype, device=self.device)
                for rows in _gemm_rows(self.prefill_budget):
                    for m in lins:
                        if m.in_features == k:
                            m(x[:, :rows])

    # ------------------------------------------------------------------------------ speculative decoding
    def _can_speculate(self) -> bool:
        """Greedy rows only, room for k drafts in every row (the last few tokens decode plainly), and the
        governor's consent (speculation "auto": only while it has been faster than plain decoding here)."""
        k = self.spec_k
        return (
            self.draft is not None
            and all(
                r.temperature == 0
                and r.max_new_tokens - len(r.output) > k
                and r.cached + k + 1 <= self.max_seq_len
                for r in self.running
            )
            and self.governor.wants(_bucket(len(self.running), self.buckets))
        )

    def _draft_prefills(self, reqs: list[Request]) -> bool:
        """Prefill the draft with everything the model has cached of each row it has not seen yet, at the first
        round that wants it rather than at admission: with speculation "auto" a paused draft then costs nothing
        (on the 8B shape its prefill at admission had added ~37 ms to the time to first token, bench/TORCH.md
        session 18), and the rows of a round are packed back to back within the prefill budget, as the model's
        prompts are, instead of one forward each. A row the draft cache has no room for yet is left out (its
        round decodes plainly, _speculate). True if any ran."""
        todo = []
        for r in reqs:
            if r.draft_cached:
                continue
            try:
                self.draft_cache.reserve(r.id, r.cached + self.spec_k + 1)
            except OutOfBlocks:
                continue
            todo.append(r)
        ran = bool(todo)
        while todo:
            pack = [todo.pop(0)]
            total = pack[0].cached
            while todo and total + todo[0].cached <= self.prefill_budget:
                total += todo[0].cached
                pack.append(todo.pop(0))
            self._draft_prefill(pack)
        return ran

    def _draft_prefill(self, pack: list[Request]) -> None:
        """One forward of the draft over these rows' cached tokens (packed when several)."""
        dc, dev = self.draft_cache, self.device
        batch = [(r, (r.prompt + r.output)[: r.cached]) for r in pack]
        if len(pack) == 1:
            r, tokens = batch[0]
            self.draft.prefill(torch.tensor([tokens], device=dev), dc.slots(r.id, 0, r.cached).to(dev))
        else:
            self._packed(self.draft, dc, batch)
        for r in pack:
            r.draft_cached = r.cached

    def _rows(self, cache: PagedKVCache, reqs, starts: list[int], tokens: list[list[int]], real: list[int]):
        """[rows, S] tokens/positions, block tables, slots [rows*S] for S tokens per request from starts[i];
        positions past real[i] (and padded rows) write to the pad block."""
        rows, s = _bucket(len(reqs), self.buckets), len(tokens[0])
        tok = torch.zeros(rows, s, dtype=torch.long)
        pos = torch.arange(s).repeat(rows, 1)
        slots = torch.full((rows, s), PAD_BLOCK * cache.block_size, dtype=torch.long)
        for i, r in enumerate(reqs):
            tok[i] = torch.tensor(tokens[i])
            pos[i] += starts[i]
            slots[i, : real[i]] = cache.slots(r.id, starts[i], starts[i] + real[i])
        tables = cache.block_table([r.id for r in reqs], self._width(cache, reqs), rows)
        return tuple(t.to(self.device, non_blocking=True) for t in (tok, pos, tables, slots.view(-1)))

    @torch.no_grad()
    def _draft_tokens(self, reqs: list[Request], start: torch.Tensor) -> torch.Tensor:
        """k greedy draft tokens per request, [len(reqs), k] on the device (start [n]: each row's cached tokens
        there): a 2-token catch-up (what the draft has not seen), then k - 1 decode steps of the draft (step and
        argmax: one graph), each fed the previous argmax on the device. Their positions and slots do not depend on
        the tokens: computed on the device from each row's start and the block table (_draft_steps), so nothing
        waits for the host."""
        k, dc, n = self.spec_k, self.draft_cache, len(reqs)
        seqs = [r.prompt + r.output for r in reqs]
        pend = [s[r.draft_cached :] for r, s in zip(reqs, seqs, strict=True)]  # usually 1 or 2 tokens
        width = max(map(len, pend))
        toks = [p + [0] * (width - len(p)) for p in pend]
        inputs = self._rows(dc, reqs, [r.draft_cached for r in reqs], toks, [len(p) for p in pend])
        # more after plain steps (a row near its end stops the drafts of all): ungraphed, no capture per length
        extend = self.draft_extend if width <= 2 else self.draft.extend
        with _recompile_room(self.graph_room):
            logits = extend(*inputs)
        # built on the host and copied without a wait: torch.tensor(..., device=) would wait for the catch-up
        last = torch.tensor([len(p) - 1 for p in pend]).to(logits.device, non_blocking=True)
        drafts = torch.empty(n, k, dtype=torch.long, device=logits.device)
        drafts[:, 0] = self.argmax(logits[torch.arange(n, device=logits.device), last])
        tables = dc.block_table([r.id for r in reqs], self._width(dc, reqs), _bucket(n, self.buckets))
        self._draft_steps(drafts, start, tables.to(self.device, non_blocking=True))
        return drafts

    @torch.no_grad()
    def _speculate(self) -> list[Request]:
        k, reqs = self.spec_k, self.running
        try:
            for r in reqs:
                if r.draft_cached == 0:  # _timed_decode's _draft_prefills found no room for it
                    raise OutOfBlocks("the draft cache has no room for this request yet")
                self.cache.reserve(r.id, r.cached + k + 1)
                self.draft_cache.reserve(r.id, r.cached + k + 1)
        except OutOfBlocks:
            self.draft, draft = None, self.draft  # this step decodes plainly (preempting if it must)
            try:
                return self._decode()
            finally:
                self.draft = draft
        t0 = time.perf_counter()
        # each row's cached tokens at the round's start and its last token, on the device (copied without a wait)
        start, last = (
            torch.tensor(v).to(self.device, non_blocking=True)
            for v in ([r.cached for r in reqs], [r.output[-1] for r in reqs])
        )
        drafts = self._draft_tokens(reqs, start)
        return self._land_round(self._verify(reqs, drafts, start, last, t0))

    def _verify(self, reqs, drafts, start, last, t0: float) -> _Round:
        """Queue the model's verify of the drafts (one extend a row of its last token and its k drafts at
        positions start..start + k, slots through the block table, on the device) and the round's accepted counts
        there, and start copying the drafts and the model's greedy tokens to the host."""
        k, n, dev = self.spec_k, len(reqs), self.device
        rows = _bucket(n, self.buckets)
        tables = self.cache.block_table([r.id for r in reqs], self._width(self.cache, reqs), rows)
        tables = tables.to(dev, non_blocking=True)
        pos = torch.zeros(rows, k + 1, dtype=torch.long, device=dev)  # padded rows: from 0, the pad block
        pos[:n] = start[:, None] + torch.arange(k + 1, device=dev)
        slots = _slots_of(tables, pos, self.cache.block_size).view(-1)
        tok = torch.zeros(rows, k + 1, dtype=torch.long, device=dev)
        tok[:n, 0], tok[:n, 1:] = last, drafts
        with _recompile_room(self.graph_room):
            greedy = self.argmax(self.extend_fn(tok, pos, tables, slots)[:n])  # [n, k + 1]
        # drafts the model agrees with, on the device: what a chained next round is derived from
        n_ok = torch.cumprod((drafts == greedy[:, :k]).long(), 1).sum(1) if self.overlap_rounds else None
        both = torch.cat([drafts, greedy], 1)
        self.stats.decode_s += time.perf_counter() - t0
        return _Round(list(reqs), drafts, greedy, n_ok, start, _to_host(both))

    def _land_round(self, rnd: _Round) -> list[Request]:
        """Read a queued round's drafts and greedy tokens (queueing the next round first when it is certain) and
        keep each row's accepted drafts and the model's next token; a row that finished before (a stop token in
        the previous round) ignores them."""
        k = self.spec_k
        self._round = self._queue_next_round(rnd)
        t0 = time.perf_counter()
        both = rnd.tokens()  # the round's one read of the device
        self.stats.decode_s += time.perf_counter() - t0
        self.stats.decode_steps += 1
        self.stats.spec_rounds += 1
        finished = []
        for r, row in zip(rnd.reqs, both, strict=True):
            if r.t_done is not None:
                continue
            d, g = row[:k], row[k:]
            n_ok = next((i for i in range(k) if d[i] != g[i]), k)  # drafts the model agrees with
            self.stats.drafted += k
            self.stats.accepted += n_ok
            # the draft holds k/v through the round's last token and d[0..k-2]: its catch-up is 1 or 2 tokens
            r.draft_cached = r.cached + 1 + min(n_ok, k - 1)
            for t in d[:n_ok] + [g[n_ok]]:
                r.output.append(t)
                r.cached += 1
                self.stats.decode_tokens += 1
                if r.done:
                    break
            if r.done:
                self._finish(r)
                finished.append(r)
        self.running = [r for r in self.running if not r.done]
        if self._round is not None and all(r.done for r in self._round.reqs):
            self._round = None  # every row stopped in this round: the queued one's tokens are not needed
        return finished

    def _queue_next_round(self, rnd: _Round) -> _Round | None:
        """The round after rnd, queued now if it is certain: overlap_rounds on, the same rows running, nobody
        waiting, speculation wanted, and every row greedy with room after rnd (at most k + 1 tokens) for another
        round in its token budget, the sequence limit and the pools of both caches."""
        k, reqs = self.spec_k, rnd.reqs
        same = len(self.running) == len(reqs) and all(a is b for a, b in zip(self.running, reqs))
        if not self.overlap_rounds or self.waiting or self.chunking or not same:
            return None
        if not self.governor.wants(_bucket(len(reqs), self.buckets)):
            return None
        if any(
            r.temperature > 0
            or r.max_new_tokens - len(r.output) <= 2 * k + 1
            or r.cached + 2 * (k + 1) > self.max_seq_len
            for r in reqs
        ):
            return None
        try:
            for r in reqs:
                self.cache.reserve(r.id, r.cached + 2 * (k + 1))
                self.draft_cache.reserve(r.id, r.cached + 2 * (k + 1))
        except OutOfBlocks:
            return None  # blocks reserved for some rows stay theirs: freed with the row
        self.stats.queued_rounds += 1
        return self._queue_chained(rnd)

    @torch.no_grad()
    def _queue_chained(self, prev: _Round) -> _Round:
        """A speculative round whose inputs come from prev's outputs on the device: each row's cached tokens
        after prev (start + accepted + 1), its next token (the model's greedy token after the accepted drafts),
        the draft's catch-up (that token, after the last draft when all k were accepted: the draft wrote k/v for
        the first k - 1 only), then the draft's steps and the model's verify, positions and slots through the
        block tables."""
        t0 = time.perf_counter()
        k, dc, reqs, dev = self.spec_k, self.draft_cache, prev.reqs, self.device
        n = len(reqs)
        rows = _bucket(n, self.buckets)
        full = prev.n_ok == k
        start = prev.start + prev.n_ok + 1
        last = prev.greedy.gather(1, prev.n_ok[:, None])[:, 0]
        ids = [r.id for r in reqs]
        dtables = dc.block_table(ids, self._width(dc, reqs), rows).to(dev, non_blocking=True)
        tok = torch.zeros(rows, 2, dtype=torch.long, device=dev)
        tok[:n, 0] = torch.where(full, prev.drafts[:, k - 1], last)
        tok[:n, 1] = torch.where(full, last, 0)
        pos = torch.zeros(rows, 2, dtype=torch.long, device=dev)
        pos[:n] = (prev.start + 1 + prev.n_ok.clamp(max=k - 1))[:, None] + torch.arange(2, device=dev)
        slots = _slots_of(dtables, pos, dc.block_size)
        real = torch.zeros(rows, 2, dtype=torch.bool, device=dev)
        real[:n, 0], real[:n, 1] = True, full
        slots = torch.where(real, slots, PAD_BLOCK * dc.block_size)
        with _recompile_room(self.graph_room):
            logits = self.draft_extend(tok, pos, dtables, slots.view(-1))
        drafts = torch.empty(n, k, dtype=torch.long, device=dev)
        drafts[:, 0] = self.argmax(logits[torch.arange(n, device=dev), full.long()])
        self._draft_steps(drafts, start, dtables)
        return self._verify(reqs, drafts, start, last, t0)

    def _draft_steps(self, drafts: torch.Tensor, start: torch.Tensor, tables: torch.Tensor) -> None:
        """The draft's steps 1..k-1 of a round, on the device: step j feeds drafts[:, j - 1] at position
        start + j (start [n]: each row's cached tokens at the round's start; the tables' padded rows at 0, the pad
        block, whose slots are its own) and writes its greedy token into drafts[:, j]. Every step's positions and
        slots are computed at once."""
        k, dc, dev, n = self.spec_k, self.draft_cache, start.device, drafts.shape[0]
        if k == 1:
            return
        rows = tables.shape[0]
        pos = torch.zeros(rows, k - 1, dtype=torch.long, device=dev)
        pos[:n] = start[:, None] + torch.arange(1, k, device=dev)
        pos, slots = pos.T.contiguous(), _slots_of(tables, pos, dc.block_size).T.contiguous()
        tok = torch.zeros(rows, dtype=torch.long, device=dev)
        tok[:n] = drafts[:, 0]
        with _recompile_room(self.graph_room):
            for j in range(1, k):
                tok = self.draft_greedy(tok, pos[j - 1], tables, pos[j - 1] + 1, slots[j - 1])
                drafts[:, j] = tok[:n]

    def _sample(self, logits: torch.Tensor, reqs: list[Request]) -> list[int]:
        return self._pick(logits, reqs).tolist()

    def _pick(self, logits: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
        """logits [>=len(reqs), V] fp32 → one token per request (greedy unless temperature > 0), on the device."""
        out = self.argmax(logits[: len(reqs)])
        for i, r in enumerate(reqs):
            if r.temperature > 0:
                out[i] = _sample_top_p(logits[i] / r.temperature, r.top_p, self._gen)
        return out


class _PaddedPrefill:
    """model.prefill of one right-padded row (ids [1, t], slots [t], last_index [1]): what a CUDA graph holds."""

    def __init__(self, model):
        self.model = model

    def __call__(self, ids: torch.Tensor, slots: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        return self.model.prefill(ids, slots, last_index=last)


@dataclass
class _Burst:
    """A multi-step burst queued on the device: its rows, steps, tokens [n, rows] there, and a reader of
    the rows' tokens [len(reqs), n] on the host."""

    reqs: list[Request]
    n: int
    out: torch.Tensor
    tokens: Callable[[], list[list[int]]]


@dataclass
class _Round:
    """A speculative round queued on the device: its rows, drafts [n, k], the model's greedy tokens [n, k + 1],
    the accepted drafts a row [n] and each row's cached tokens at its start [n] there (what a chained round is
    derived from), and a reader of the drafts and greedy tokens on the host."""

    reqs: list[Request]
    drafts: torch.Tensor
    greedy: torch.Tensor
    n_ok: torch.Tensor | None  # None without overlap_rounds
    start: torch.Tensor
    tokens: Callable[[], list[list[int]]]


def _slots_of(tables: torch.Tensor, pos: torch.Tensor, block_size: int) -> torch.Tensor:
    """The physical slots of positions pos [rows, ...] through block tables [rows, width], on their device."""
    shape = pos.shape
    flat = pos.reshape(shape[0], -1)
    blocks = tables.long().gather(1, flat // block_size)
    return (blocks * block_size + flat % block_size).reshape(shape)


@dataclass
class _Prefill:
    """A prefill queued on the device: its requests and prompt tokens, and a reader of its first tokens."""

    batch: list[tuple[Request, list[int]]]
    tokens: int
    t0: float
    firsts: Callable[[], list[int]]


def _to_host(t: torch.Tensor) -> Callable[[], list[int]]:
    """Start copying t to the host; the callable waits for that copy only (not for work queued after it)."""
    if t.device.type != "cuda":
        values = t.tolist()
        return lambda: values
    buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    buf.copy_(t, non_blocking=True)
    done = torch.cuda.Event()
    done.record()

    def read() -> list[int]:
        done.synchronize()
        return buf.tolist()

    return read


def _last_argmax(logits: torch.Tensor) -> torch.Tensor:
    return logits.argmax(-1)


class _Greedy:
    """argmax(model(*decode inputs)): the step a multi-step burst chains (captured whole on CUDA)."""

    def __init__(self, model, argmax: Callable[[torch.Tensor], torch.Tensor] = _last_argmax):
        self.model, self.argmax = model, argmax

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.argmax(self.model(*inputs))


def _sample_top_p(logits: torch.Tensor, top_p: float, gen: torch.Generator) -> torch.Tensor:
    probs = torch.softmax(logits.float(), -1)
    sorted_p, idx = probs.sort(descending=True)
    keep = sorted_p.cumsum(-1) - sorted_p < top_p  # always keeps the most likely token
    sorted_p = sorted_p * keep
    choice = torch.multinomial(sorted_p / sorted_p.sum(), 1, generator=gen)
    return idx[choice[0]]


@contextlib.contextmanager
def _recompile_room(n: int):
    """Each (batch bucket, table width) can be a compiled graph (Engine.graph_room): let dynamo keep that many,
    only here."""
    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    with cfg.patch(**{name: max(getattr(cfg, name), n)}):
        yield
