"""Continuous batching: each request gets the tokens it gets alone, whatever joins or leaves around it."""

import pytest
import torch

from lorafast_export.errors import InputError
from lorafast_export.model.decoder import load_decoder
from lorafast_export.runtime.engine import Engine
from tests.runtime.helpers import greedy_reference, paged, record_step_shapes, tiny_checkpoint

PROMPT_LENS = [5, 17, 3, 9, 30, 1]
NEW = [12, 4, 20, 7, 15, 9]


def prompts(seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 96, (n,), generator=g).tolist() for n in PROMPT_LENS]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("m"))


@pytest.fixture(scope="module")
def solo(llama):
    dec = load_decoder(llama)
    return [greedy_reference(dec, p, n) for p, n in zip(prompts(), NEW, strict=True)]


def make_engine(md, num_blocks=64, max_batch=3, compile=False, decode_steps=1, **kw):
    pm, cache = paged(md, num_blocks=num_blocks)
    buckets = (max_batch,) if compile else (1, 2, 4)  # compiled: one batch shape and one table width,
    return Engine(
        pm,
        cache,
        max_batch=max_batch,
        max_seq_len=64,
        batch_buckets=buckets,
        compile=compile,
        fixed_width=compile,
        decode_steps=decode_steps,
        **kw,
    )  # so one CPU compile (~10 s) serves the whole test


def test_continuous_batch_equals_each_request_alone(llama, solo):
    eng = make_engine(llama)
    assert eng.generate_batch(prompts(), NEW) == solo
    assert eng.stats.preemptions == 0 and eng.cache.allocator.free_count == 64  # every block came back


@pytest.mark.parametrize("num_blocks", [64, 14])  # 14: the pool runs out, bursts fall back and preempt
def test_multi_step_decode_equals_each_request_alone(llama, solo, num_blocks):
    eng = make_engine(llama, num_blocks=num_blocks, decode_steps=5)
    assert eng.generate_batch(prompts(), NEW) == solo
    assert eng.stats.bursts > 0 and eng.cache.allocator.free_count == num_blocks
    if num_blocks == 64:  # every token after the first (prefill's) comes from a decode step, none wasted
        assert eng.stats.preemptions == 0 and eng.stats.decode_tokens == sum(NEW) - len(NEW)
    else:
        assert eng.stats.preemptions > 0


def test_multi_step_stops_at_a_stop_token_mid_burst(llama, solo):
    stop = solo[4][6]  # a token request 4 makes mid-burst; every request stops at its first occurrence
    want = [o[: o.index(stop) + 1] if stop in o else o for o in solo]
    eng = make_engine(llama, decode_steps=8)
    assert eng.generate_batch(prompts(), NEW, stop_ids=(stop,)) == want
    assert eng.stats.bursts > 0 and eng.cache.allocator.free_count == 64


@pytest.mark.parametrize("stop", [False, True])  # True: request 4 stops mid-burst, one burst queued after it
def test_overlapped_bursts_equal_each_request_alone(llama, solo, stop):
    """A burst queued before the host reads the previous one's tokens (fed by them on the device) gives the
    tokens of single steps; a request added while a burst is queued gets its own tokens too."""
    ps, want = prompts(), solo
    kw = {}
    if stop:
        kw["stop_ids"] = (solo[4][6],)
        want = [o[: o.index(solo[4][6]) + 1] if solo[4][6] in o else o for o in solo]
    eng = make_engine(llama, max_batch=4, decode_steps=3)
    reqs = [eng.add(ps[i], NEW[i], **kw) for i in (4, 2)]  # 15 and 20 new tokens: bursts of 3
    for _ in range(3):
        eng.step()
    assert eng._queued is not None  # a burst is on the "device" while the host admits the next request
    late = eng.add(ps[0], NEW[0], **kw)
    while eng.has_work:
        eng.step()
    assert [r.output for r in (*reqs, late)] == [want[4], want[2], want[0]]
    assert eng.stats.queued_bursts > 0 and eng._queued is None
    assert eng.cache.allocator.free_count == 64
    off = make_engine(llama, max_batch=4, decode_steps=3, overlap_bursts=False)
    assert off.generate_batch([ps[4], ps[2]], [NEW[4], NEW[2]], **kw) == [want[4], want[2]]
    assert off.stats.queued_bursts == 0


def test_shortest_first_admission_prefills_short_prompts_first_same_tokens(llama, solo):
    eng = make_engine(llama, decode_steps=4, admit_order="shortest", prefill_budget=32)
    reqs = [eng.add(p, n) for p, n in zip(prompts(), NEW, strict=True)]
    eng.step()  # shortest first: the 1-, 3- and 5-token prompts fill the 3 rows (within 32 prompt tokens)
    assert [r.t_first is not None for r in reqs] == [n in (1, 3, 5) for n in PROMPT_LENS]
    while eng.has_work:
        eng.step()
    assert [r.output for r in reqs] == solo
    with pytest.raises(InputError, match="admit_order='newest'"):
        make_engine(llama, admit_order="newest")
    with pytest.raises(InputError, match="max_wait_ms=-1"):
        make_engine(llama, max_wait_ms=-1)


def test_prefill_first_admits_the_queue_before_decoding_same_tokens(llama, solo):
    eng = make_engine(
        llama, max_batch=4, decode_steps=4, prefill_budget=22, prefill_first=True, admit_order="arrival"
    )
    reqs = [eng.add(p, n) for p, n in zip(prompts(), NEW, strict=True)]
    eng.step()  # 4 rows: prompts of 5 and 17 tokens, then 3 and 9 (within 22 tokens each), then a decode
    assert [r.t_first is not None for r in reqs] == [True] * 4 + [False] * 2
    assert [n for _, n, _, _ in eng.stats.prefills] == [2, 2] and eng.stats.decode_steps > 0
    while eng.has_work:
        eng.step()
    assert [r.output for r in reqs] == solo


class FakeClock:
    """The engine's clock, stepped by the test: one second per engine step."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def stream_of_short_prompts(eng, clock, long_prompt, steps, seed=3):
    """Two short requests busy the 2 rows, then the long one arrives, then one short request per step."""
    g = torch.Generator().manual_seed(seed)
    short = [torch.randint(0, 96, (int(n),), generator=g).tolist() for n in torch.randint(1, 4, (steps + 2,))]
    reqs = [eng.add(short[0], 3), eng.add(short[1], 3)]
    eng.step()
    clock.now += 1
    big = eng.add(long_prompt, 4)
    for p in short[2:]:
        reqs.append(eng.add(p, 3))
        eng.step()
        clock.now += 1
    return big, reqs


@pytest.mark.parametrize("max_wait_ms", [1e9, 5000.0])  # 1e9: no aging within the test; 5000: 5 steps
def test_shortest_first_ages_so_a_long_prompt_is_not_starved(llama, max_wait_ms):
    clock = FakeClock()
    eng = make_engine(llama, max_batch=2, admit_order="shortest", max_wait_ms=max_wait_ms, clock=clock)
    long_prompt = prompts()[4]  # 30 tokens
    big, reqs = stream_of_short_prompts(eng, clock, long_prompt, steps=30)
    if max_wait_ms > 1e6:  # the starvation aging prevents: 30 short requests went first, one per step
        assert big.t_first is None and sum(r.t_first is not None for r in reqs) >= 25
        return
    # admitted once it waited more than 5 s (the clock reads 1 s per step): at the first step after that
    # when a row is free; nothing younger was admitted from then on until it was
    assert big.t_first is not None and 5 < big.t_first - big.t_added <= 8
    younger = [r for r in reqs if r.t_added > big.t_added + 5 and r.t_first is not None]
    assert younger and all(r.t_first >= big.t_first for r in younger)
    while eng.has_work:
        eng.step()
    dec = load_decoder(llama)
    assert big.output == greedy_reference(dec, long_prompt, 4)
    assert [r.output for r in reqs[:6]] == [greedy_reference(dec, r.prompt, 3) for r in reqs[:6]]


def test_aged_requests_are_never_overtaken_by_younger_ones(llama):
    """A random stream (0-2 arrivals per step, prompts of 1-30 tokens): each step's admissions are a prefix
    of the admission order the option documents (aged requests by arrival, then shortest first); a
    request that has aged is never passed by a younger one; every output equals the request decoded alone."""
    clock, rnd = FakeClock(), torch.Generator().manual_seed(5)
    eng = make_engine(llama, max_batch=3, admit_order="shortest", max_wait_ms=3000.0, clock=clock)
    reqs = []
    for _ in range(40):
        for _ in range(int(torch.randint(0, 3, (1,), generator=rnd))):
            n = int(torch.randint(1, 31, (1,), generator=rnd))
            new = int(torch.randint(1, 9, (1,), generator=rnd))
            reqs.append(eng.add(torch.randint(0, 96, (n,), generator=rnd).tolist(), new))
        waiting = list(eng.waiting)
        aged = {r.id for r in waiting if r.t_added < clock.now - 3}
        want = sorted(waiting, key=lambda r: (0, r.t_added) if r.id in aged else (1, len(r.prompt)))
        eng.step()
        admitted = {r.id for r in waiting if r.t_first is not None}
        assert admitted == {r.id for r in want[: len(admitted)]}  # a prefix of the documented order
        left_aged = [r.t_added for r in waiting if r.id in aged and r.id not in admitted]
        assert not left_aged or all(r.t_added <= min(left_aged) for r in waiting if r.id in admitted)
        clock.now += 1
    while eng.has_work:
        eng.step()
    dec = load_decoder(llama)
    assert eng.stats.preemptions == 0 and any(r.t_first - r.t_added > 3 for r in reqs)  # aging was used
    assert [r.output for r in reqs] == [greedy_reference(dec, r.prompt, r.max_new_tokens) for r in reqs]


def test_requests_joining_between_steps(llama, solo):
    eng = make_engine(llama)
    ps, reqs = prompts(), []
    for p, n in zip(ps, NEW, strict=True):  # one new request after every decode step
        reqs.append(eng.add(p, n))
        eng.step()
    while eng.has_work:
        eng.step()
    assert [r.output for r in reqs] == solo


def chunks_of(n: int, chunk: int) -> int:
    """Chunks of a prompt of n > chunk tokens: ceil(n / chunk), a lone last token joining the chunk before it."""
    return -(-n // chunk) - (n % chunk == 1)


@pytest.mark.parametrize(
    "chunk,num_blocks,decode_steps",
    [(4, 64, 1), (7, 64, 4), (6, 12, 1)],  # 12 blocks: the pool runs out, a request is preempted and redone
)
def test_chunked_prefill_equals_each_request_alone(llama, solo, chunk, num_blocks, decode_steps):
    """Prompts longer than prefill_chunk are prefilled a chunk a step (the first from position 0, each later
    one on top of the cached prefix); every request still gets the tokens it gets alone."""
    eng = make_engine(llama, num_blocks=num_blocks, decode_steps=decode_steps, prefill_chunk=chunk)
    assert eng.generate_batch(prompts(), NEW) == solo
    assert eng.cache.allocator.free_count == num_blocks and not eng.chunking
    if num_blocks == 64:  # each long prompt once, in chunks_of(len, chunk) chunks
        assert eng.stats.prefill_chunks == sum(chunks_of(n, chunk) for n in PROMPT_LENS if n > chunk)
    else:
        assert eng.stats.preemptions > 0  # and its prompt + tokens prefilled again, in chunks (13 in all)
        assert eng.stats.prefill_chunks > sum(chunks_of(n, chunk) for n in PROMPT_LENS if n > chunk)


def test_running_requests_decode_between_a_long_prompts_chunks(llama, solo):
    """While a 30-token prompt is prefilled in chunks of 4 (8 steps), the requests already running get a
    token at every one of those steps; the long one's first token comes after its last chunk."""
    ps = prompts()
    eng = make_engine(llama, prefill_chunk=4, prefill_first=True)
    short = [eng.add(ps[i], NEW[i]) for i in (2, 5)]  # 3 and 1 tokens: prefilled whole
    eng.step()
    long = eng.add(ps[4], NEW[4])  # 30 tokens
    grew = []
    while long.t_first is None:
        before = [len(r.output) for r in short]
        eng.step()
        grew.append([len(r.output) - b for r, b in zip(short, before, strict=True)])
    assert eng.stats.prefill_chunks == 8 and len(grew) == 8
    assert all(g == [1, 1] for g in grew[:7])  # a decode step after every chunk (while both still run)
    while eng.has_work:
        eng.step()
    assert [r.output for r in (*short, long)] == [solo[2], solo[5], solo[4]]


def test_the_step_of_a_prompts_last_chunk_decodes_one_token(llama, solo):
    """With bursts (decode_steps 8), the step that prefills a prompt's last chunk decodes one step, not a burst:
    its first token is returned without waiting for 8 more steps of every row (at 8B on an H100 a burst of 5
    rows is ~45 ms, half the first-token time of a 3,000-token prompt). The next step bursts again."""
    ps = prompts()
    eng = make_engine(llama, prefill_chunk=4, decode_steps=8)
    short = [eng.add(ps[i], 40) for i in (2, 5)]
    eng.step()
    long = eng.add(ps[4], NEW[4])  # 30 tokens: 8 chunks
    steps = []
    while long.t_first is None:
        before = eng.stats.decode_steps
        eng.step()
        steps.append(eng.stats.decode_steps - before)
    assert len(steps) == 8 and steps[-1] == 1
    before = eng.stats.decode_steps
    eng.step()
    assert eng.stats.decode_steps - before > 1  # bursts again once nothing is chunking
    while eng.has_work:
        eng.step()
    dec = load_decoder(llama)
    assert long.output == solo[4]
    assert [r.output for r in short] == [greedy_reference(dec, ps[i], 40) for i in (2, 5)]


def test_warm_up_compiles_the_chunk_layer_before_any_request(llama, solo):
    """With prefill_chunk and the prefill compiled (as on CUDA), warm_up runs later chunks, so that the chunked
    requests after it compile nothing more (without those warm chunks they compiled graphs) and still get the
    tokens they get alone; one graph, dynamic in length and prefix: a prompt whose last chunk would be one token
    (15 = 7 + 7 + 1, a size dynamo specialises) ends on a chunk of 8 instead."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    pm, cache = paged(llama, num_blocks=64)
    pm.compile_prefill()
    eng = Engine(pm, cache, max_batch=3, max_seq_len=64, batch_buckets=(1, 2, 4), prefill_chunk=7)
    graphs = lambda: len(_debug_get_cache_entry_list(pm.chunk_fn._torchdynamo_orig_callable.__code__))  # noqa: E731
    eng.warm_up()
    warmed = graphs()
    assert warmed > 0
    assert eng.generate_batch(prompts(), NEW) == solo
    assert eng.stats.prefill_chunks == sum(chunks_of(n, 7) for n in PROMPT_LENS if n > 7)
    lone = torch.randint(0, 96, (15,), generator=torch.Generator().manual_seed(3)).tolist()
    before = eng.stats.prefill_chunks
    assert eng.generate_batch([lone], 5) == [greedy_reference(load_decoder(llama), lone, 5)]
    assert eng.stats.prefill_chunks - before == 2
    assert graphs() == warmed == 1


def test_warm_up_runs_no_chunk_where_no_prompt_can_be_chunked(llama):
    """A prompt leaves room for one new token, so with max_seq_len <= prefill_chunk + 1 nothing is ever chunked:
    warm_up compiles no chunk graph there (a runtime whose max_seq_len is at most its chunk pays no compile)."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    for max_seq_len, chunked in ((8, False), (9, True)):
        pm, cache = paged(llama, num_blocks=64)
        pm.compile_prefill()
        eng = Engine(pm, cache, max_batch=2, max_seq_len=max_seq_len, batch_buckets=(1, 2), prefill_chunk=7)
        eng.warm_up()
        code = pm.chunk_fn._torchdynamo_orig_callable.__code__
        assert (len(_debug_get_cache_entry_list(code)) > 0) is chunked


def test_prefill_chunk_is_checked(llama):
    with pytest.raises(InputError, match="prefill_chunk=-1"):
        make_engine(llama, prefill_chunk=-1)

    class NoChunk:  # a model without a chunk forward (the AOT packages)
        def __init__(self, pm):
            self.prefill, self.extend = pm.prefill, pm.extend

        def __call__(self, *a):
            raise AssertionError

    pm, cache = paged(llama)
    with pytest.raises(InputError, match="chunk forward"):
        Engine(NoChunk(pm), cache, max_batch=2, max_seq_len=64, prefill_chunk=8)


def test_preemption_when_the_pool_is_full_keeps_tokens(llama, solo):
    eng = make_engine(llama, num_blocks=14)  # 56 tokens for 3 sequences of up to 45
    assert eng.generate_batch(prompts(), NEW) == solo
    assert eng.stats.preemptions > 0


@pytest.mark.parametrize("decode_steps", [1, 4])  # 4: bursts through the compiled step (CUDA: its graph)
def test_compiled_decode_equals_eager(llama, solo, decode_steps):
    eng = make_engine(llama, max_batch=4, compile=True, decode_steps=decode_steps)
    assert eng.generate_batch(prompts()[:4], NEW[:4]) == solo[:4]
    assert (eng.stats.bursts > 0) == (decode_steps > 1)


def test_sampling_is_seeded_and_in_range(llama):
    outs = [make_engine(llama).generate_batch(prompts()[:2], 6, temperature=0.8, top_p=0.9) for _ in range(2)]
    assert outs[0] == outs[1] and all(0 <= t < 96 for o in outs[0] for t in o)


def test_request_errors(llama):
    eng = make_engine(llama, num_blocks=4)
    with pytest.raises(InputError, match="max_seq_len=64"):
        eng.add([1] * 60, 10)
    with pytest.raises(InputError, match="cannot fit in the KV pool"):
        eng.add([1] * 20, 10)
    with pytest.raises(InputError, match="at least one token"):
        eng.add([], 3)


def test_padded_single_prompt_prefill_same_tokens(llama, solo):
    """The CUDA-graph prefill's input: one prompt right-padded to a power of two (here run eagerly)."""
    from lorafast_export.runtime.engine import _PaddedPrefill

    eng = make_engine(llama, max_batch=1)
    eng.prefill_graph = _PaddedPrefill(eng.model)
    assert eng.generate_batch(prompts(), NEW) == solo


@pytest.mark.parametrize("decode_steps", [1, 5])
def test_warm_up_runs_every_step_shape_a_workload_meets(llama, solo, decode_steps):
    """After warm_up, no workload meets a step shape (the key of a CUDA graph, and a dynamo compile) that the
    warm-up did not run; the warm-up writes only the pad block, so the tokens and the free pool are unchanged."""
    from lorafast_export.runtime.engine import _PaddedPrefill

    eng = make_engine(llama, max_batch=3, decode_steps=decode_steps)
    eng.prefill_graph = _PaddedPrefill(eng.model)  # the CUDA engine's graphed prefill, run eagerly here
    recs = record_step_shapes(eng, ("greedy_fn", "decode_fn", "prefill_graph"))
    assert eng.warm_up() == len(eng.buckets) * len(eng.widths()) + len(eng.prefill_graph_lengths()) + 3
    assert eng.widths() == [2, 4, 8, 16] and eng.prefill_graph_lengths() == [16, 32, 64]
    warmed = {n: set(r.keys) for n, r in recs.items()}
    for r in recs.values():
        r.keys.clear()
    assert eng.generate_batch(prompts(), NEW) == solo and eng.cache.allocator.free_count == 64
    assert recs["greedy_fn"].keys and recs["prefill_graph"].keys  # the workload stepped through both
    assert not recs["decode_fn"].keys  # greedy rows: every plain step takes the greedy graph too
    for n, r in recs.items():
        assert r.keys <= warmed[n], n


def test_warm_up_runs_the_head_at_every_row_count_a_workload_meets(llama, solo):
    """A packed prefill's head reads one row per prompt, and cuBLAS chooses its kernel by the row count (its first
    call at a new count cost ~50 ms on an H200's host): the warm-up runs the head at every count a prefill can
    pack (1 to max_batch prompts), and no workload calls it at a count the warm-up did not."""
    eng = make_engine(llama, max_batch=6)
    seen: list[int] = []
    head = eng.model.dec.logits

    def logits(x):
        seen.append(x.reshape(-1, x.shape[-1]).shape[0])
        return head(x)

    eng.model.dec.logits = logits
    eng.warm_up()
    warmed, seen[:] = set(seen), []
    assert set(range(1, eng.max_batch + 1)) <= warmed
    assert eng.generate_batch(prompts(), NEW) == solo
    assert max(seen) > 4  # a prefill packed more prompts than any decode bucket has rows
    assert set(seen) <= warmed


def test_prefill_gemm_warm_up_runs_every_linear_at_every_listed_row_count(llama):
    """On CUDA the warm-up also runs one layer's linears at the row counts a packed prefill's GEMMs meet (cuBLAS
    picks its kernel by the row count and loads it lazily on first use): every count up to 64, then at most 8
    apart up to the budget. Run here on the CPU directly: each distinct linear sees every listed count once."""
    from lorafast_export.runtime.engine import _gemm_rows

    eng = make_engine(llama, max_batch=4)
    eng.prefill_budget = 300
    rows = _gemm_rows(eng.prefill_budget)
    assert rows[:64] == list(range(1, 65)) and rows[-1] == 300
    assert max(b - a for a, b in zip(rows, rows[1:], strict=False)) <= 8
    seen: dict[str, list[int]] = {}
    hooks = [
        m.register_forward_hook(
            lambda mod, args, out, n=name: seen.setdefault(n, []).append(args[0].shape[-2])
        )
        for name, m in eng.model.dec.model.named_modules()
        if hasattr(m, "in_features") and not any(m.children())
    ]
    eng._warm_prefill_gemms(eng.model.dec, torch.float32)
    for h in hooks:
        h.remove()
    first = {n: r for n, r in seen.items() if n.startswith("layers.0.")}
    # the layers share their shapes: only the first runs
    assert first and all(r == rows for r in first.values())
    assert set(seen) == set(first)


@pytest.mark.parametrize("budget,longest", [(4096, 4095), (4096, 1023), (4096, 63), (1000, 999), (253, 63)])
def test_warm_up_packs_sizes_dynamo_cannot_specialise(budget, longest):
    """The warm-up's packed prefill: within the budget and the longest prompt, an odd count (>= 3) of odd
    lengths >= 3 (model dimensions are even: no size is duck-sized equal to one), total, count and longest
    distinct, and at least half the budget (its memory is what a full prefill needs)."""
    from lorafast_export.runtime.engine import _pack_lens

    lens = _pack_lens(budget, longest)
    assert budget // 2 < sum(lens) <= budget and max(lens) <= longest and min(lens) >= 3
    assert len(lens) % 2 == 1 and len(lens) >= 3 and all(n % 2 for n in lens)
    assert len({sum(lens), len(lens), max(lens)}) == 3


@pytest.mark.parametrize(
    "budget,longest,rows", [(4096, 1023, 32), (4096, 4095, 8), (4096, 63, 3), (200, 99, 64)]
)
def test_warm_up_packs_the_largest_attention_grid(budget, longest, rows):
    """The warm-up's other packed prefill: the most prompts the batch takes (odd) with the longest prompt the
    budget leaves, so that its padded attention grid is the largest any admitted pack can make."""
    from lorafast_export.runtime.engine import _grid_lens

    lens = _grid_lens(budget, longest, rows)
    assert sum(lens) <= budget and max(lens) <= longest and len(lens) <= rows and min(lens) >= 3
    assert len(lens) % 2 == 1 and all(n % 2 for n in lens) and len({sum(lens), len(lens), max(lens)}) == 3
    grid = len(lens) * max(lens)
    most = rows - (rows % 2 == 0)  # the most prompts, with the longest the budget then leaves
    assert grid >= 3 * min(longest - (longest % 2 == 0), budget - 6)
    assert most < 3 or grid >= most * min(longest - (longest % 2 == 0), budget - 3 * (most - 1) - 1)
