"""Measure a runtime: prefill and decode tokens/s, time to first token, peak memory (one JSON-able dict)."""

from __future__ import annotations

import resource
import time

import torch

from lorafast_export.runtime.loader import Runtime


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # process-wide, Linux reports KiB


def run_requests(rt: Runtime, prompts: list[list[int]], news: list[int]) -> dict:
    """All requests at once through continuous batching; one timed pass (warm the runtime up first)."""
    eng = rt.engine
    eng.stats = type(eng.stats)()
    if rt.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(rt.device)
    _sync(rt.device)
    allocs, host = _device_allocs(rt.device), _host_allocs(rt.device)
    t0 = time.perf_counter()
    reqs = [eng.add(p, n) for p, n in zip(prompts, news, strict=True)]
    while eng.has_work:
        eng.step()
    _sync(rt.device)
    wall = time.perf_counter() - t0
    s = eng.stats
    ttft = sorted(r.t_first - r.t_added for r in reqs)
    new = sum(len(r.output) for r in reqs)
    return {
        "requests": len(reqs),
        "prompt_tokens": sum(map(len, prompts)),
        "new_tokens": new,
        "wall_s": wall,
        "tokens_per_s": new / wall,
        "prefill_tokens_per_s": s.prefill_tokens / s.prefill_s if s.prefill_s else None,
        "decode_tokens_per_s": s.decode_tokens / s.decode_s if s.decode_s else None,
        "decode_step_ms": 1e3 * s.decode_s / s.decode_steps if s.decode_steps else None,
        "ttft_ms_first": 1e3 * ttft[0],
        "ttft_ms_median": 1e3 * ttft[len(ttft) // 2],
        "ttft_ms_max": 1e3 * ttft[-1],
        "ttft_ms": [round(1e3 * x, 2) for x in ttft],
        "prefills": [  # the timeline: (start ms, requests, prompt tokens, ms) per prefill forward
            (round(1e3 * (t - t0), 2), n, tok, round(1e3 * dt, 2)) for t, n, tok, dt in s.prefills
        ],
        "preemptions": s.preemptions,
        "prefill_chunks": s.prefill_chunks,  # chunks of the prompts longer than prefill_chunk (0: none)
        "device_allocs": None if allocs is None else _device_allocs(rt.device) - allocs,  # cudaMalloc calls
        # pinned host blocks the caching host allocator created (cudaHostAlloc calls) and their time, ms
        "host_allocs": None if host is None else [a - b for a, b in zip(_host_allocs(rt.device), host)],
        "spec_acceptance": s.acceptance,  # None without a draft model, or when no round ran
        "spec_rounds": s.spec_rounds,  # speculative rounds (speculation "auto" pauses a draft that does not pay)
        # with a draft: speculation auto's latest decisions (speculate or pause, and the ms it judged), or []
        "spec_decisions": None if eng.draft_cache is None else list(eng.governor.decisions)[-8:],
        "peak_memory_bytes": peak_memory_bytes(rt.device),
    }


def random_prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, length), generator=g).tolist()


def bench_runtime(
    rt: Runtime, batch_sizes: list[int], prompt_len: int, new_tokens: int, seed: int = 0, warmup: bool = True
) -> dict:
    """For each batch size: that many identical-shape requests at once; a full warm-up pass first so that
    every compiled shape (batch bucket, table width) the timed pass meets already exists."""
    results = []
    for bs in batch_sizes:
        prompts = random_prompts(bs, prompt_len, rt.config.vocab_size, seed + bs)
        if warmup:
            run_requests(rt, prompts, [new_tokens] * bs)
        results.append({"batch": bs, **run_requests(rt, prompts, [new_tokens] * bs)})
    return {
        "device": str(rt.device),
        "dtype": str(rt.dtype).removeprefix("torch."),
        "attention": rt.attention,
        "compiled": rt.compiled,
        "aot": rt.aot,
        "kernels": sorted(set(rt.kernels.values())),
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "cache_bytes": rt.cache.nbytes,
        "results": results,
    }


def _host_allocs(dev: torch.device) -> tuple[int, float] | None:
    """(pinned blocks created, ms spent creating them) by the caching host allocator so far (None off CUDA, or
    where this torch does not count them)."""
    if dev.type != "cuda" or not hasattr(torch.cuda, "host_memory_stats"):
        return None
    s = torch.cuda.host_memory_stats()
    return s.get("num_host_alloc", 0), s.get("host_alloc_time.total", 0) / 1e3


def _device_allocs(dev: torch.device) -> int | None:
    """cudaMalloc calls the caching allocator has made so far (None off CUDA)."""
    return torch.cuda.memory_stats(dev).get("num_device_alloc") if dev.type == "cuda" else None
