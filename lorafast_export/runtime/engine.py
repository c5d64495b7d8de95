"""Continuous batching over the paged cache: requests join and leave between decode steps.

Each `step()`: admit waiting requests while a batch row and cache blocks are free (prefill each one alone,
SDPA, which also yields its first token), then one decode step for every running request. The decode
batch is padded to a bucket size and the block tables to a power-of-two width; batch and width are marked
dynamic, so one compiled graph serves them all (a static 8B-shaped graph took ~80 s to compile per shape on
an H200) and CUDA graphs record one replay per shape. When the pool runs out mid-decode the most recently admitted
request is preempted: its blocks are freed and it re-enters the queue to be recomputed from its prompt and
the tokens it already has (greedy output is unchanged by this).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from lorafast_export.errors import InputError
from lorafast_export.runtime.kv_cache import PAD_BLOCK, OutOfBlocks, PagedKVCache


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
    ):
        self.model, self.cache, self.device = model, cache, torch.device(device)
        self.max_batch, self.max_seq_len = max_batch, max_seq_len
        self.buckets = tuple(sorted({b for b in batch_buckets if b < max_batch} | {max_batch}))
        if compile and self.device.type == "cuda":  # batch 1 would get its own (specialized) 8B compile; a
            self.buckets = tuple(sorted({max(2, b) for b in self.buckets}))  # second row is free on a GPU
        self.max_blocks = cache.blocks_for(max_seq_len)
        self.fixed_width = fixed_width  # flex attention skips unused blocks: one width, fewer graphs
        self.compiled = compile
        self.cuda_graphs = compile and self.device.type == "cuda"
        self.decode_fn = model
        if compile:
            mode = "reduce-overhead" if self.cuda_graphs else None
            self.decode_fn = torch.compile(model, mode=mode, fullgraph=True, dynamic=False)
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
            t_added=time.perf_counter(),
        )
        self.waiting.append(r)
        return r

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

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
    def step(self) -> list[Request]:
        """Admit (and prefill) what fits, then decode one token for every running request; returns finished."""
        finished = self._admit()
        if self.running:
            finished += self._decode()
        return finished

    def _finish(self, r: Request) -> None:
        r.t_done = time.perf_counter()
        self.cache.free(r.id)

    def _admit(self) -> list[Request]:
        finished = []
        while self.waiting and len(self.running) < self.max_batch:
            r = self.waiting[0]
            tokens = r.prompt + r.output  # after a preemption: recompute what it already has
            if not self.cache.can_fit(len(tokens) + 1) and self.running:
                break  # wait for running requests to finish
            self.waiting.popleft()
            self.cache.reserve(r.id, len(tokens) + 1)
            t0 = time.perf_counter()
            ids = torch.tensor([tokens], device=self.device)
            logits = self.model.prefill(ids, self.cache.slots(r.id, 0, len(tokens)).to(self.device))
            r.output.append(self._sample(logits, [r])[0])
            self.stats.prefill_tokens += len(tokens)
            self.stats.prefill_s += time.perf_counter() - t0
            r.cached = len(tokens)
            r.t_first = r.t_first or time.perf_counter()
            if r.done:
                self._finish(r)
                finished.append(r)
            else:
                self.running.append(r)
        return finished

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
                self.waiting.appendleft(victim)
                self.stats.preemptions += 1

    def _decode(self) -> list[Request]:
        self._reserve_next()
        reqs = self.running
        if not reqs:
            return []
        t0 = time.perf_counter()
        logits = self._run_decode(reqs)
        tokens = self._sample(logits, reqs)
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

    def decode_inputs(self, reqs: list[Request]) -> tuple[torch.Tensor, ...]:
        """(tokens, positions, block_tables, seq_lens, slots) padded to the batch bucket and table width."""
        rows = _bucket(len(reqs), self.buckets)
        used = max(len(self.cache.tables[r.id]) for r in reqs)
        width = self.max_blocks if self.fixed_width else min(max(2, _pow2(used)), self.max_blocks)
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

    @torch.no_grad()
    def _run_decode(self, reqs: list[Request]) -> torch.Tensor:
        inputs = self.decode_inputs(reqs)
        if (
            self.compiled
        ):  # one compiled graph for all batch buckets and table widths (CUDA graphs: one per shape)
            # maybe_: a hint, not a constraint. Strict mark_dynamic(min=2) raised ConstraintViolationError on an
            # H200 when the graph guarded on width >= 9; now such a guard costs one more compile instead.
            for t in inputs:
                torch._dynamo.maybe_mark_dynamic(t, 0)
            if not self.fixed_width:
                torch._dynamo.maybe_mark_dynamic(inputs[2], 1)
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with _recompile_room(8):
            return self.decode_fn(*inputs)[: len(reqs)]

    def _sample(self, logits: torch.Tensor, reqs: list[Request]) -> list[int]:
        """logits [>=len(reqs), V] fp32 → one token per request (greedy unless temperature > 0)."""
        out = logits[: len(reqs)].argmax(-1)
        for i, r in enumerate(reqs):
            if r.temperature > 0:
                out[i] = _sample_top_p(logits[i] / r.temperature, r.top_p, self._gen)
        return out.tolist()


def _sample_top_p(logits: torch.Tensor, top_p: float, gen: torch.Generator) -> torch.Tensor:
    probs = torch.softmax(logits.float(), -1)
    sorted_p, idx = probs.sort(descending=True)
    keep = sorted_p.cumsum(-1) - sorted_p < top_p  # always keeps the most likely token
    sorted_p = sorted_p * keep
    choice = torch.multinomial(sorted_p / sorted_p.sum(), 1, generator=gen)
    return idx[choice[0]]


@contextlib.contextmanager
def _recompile_room(n: int):
    """Each (batch bucket, table width) is one compiled graph: let dynamo keep that many, only here."""
    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    with cfg.patch(**{name: max(getattr(cfg, name), n)}):
        yield
