"""Validation orchestration: reference + candidates → streamed metrics → report files + gates.

Every stage the build produced is a candidate, compared with the reference (the unmerged PEFT model) and with
the stage before it, block by block: logits never exist for more than one block at a time.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import time
from pathlib import Path

import torch

from lorafast_export.adapters import Adapter
from lorafast_export.dtypes import SHORT_NAMES, TORCH_DTYPES
from lorafast_export.errors import InputError
from lorafast_export.validate.candidates import (
    Candidate,
    merged_fp32_candidate,
    session_candidate,
    source_candidate,
)
from lorafast_export.validate.data import EvalSet, load_eval_sets, load_prompts
from lorafast_export.validate.gates import check_recipe_gates
from lorafast_export.validate.reference import Reference, ReferenceCache
from lorafast_export.weights import ModelDir, sha256_file

log = logging.getLogger(__name__)


@dataclasses.dataclass
class ValidationInputs:
    base: ModelDir
    adapters: list[Adapter]
    recipe: object  # Recipe
    candidates: list[Candidate]
    artifact_name: str
    target: str
    quant: str
    layer_errors: list[dict] | None = None


def _tokenizer(base: ModelDir):
    import transformers

    if not base.tokenizer_files:
        raise InputError(f"{base.path}: no tokenizer files; validation needs the base model's tokenizer.")
    return transformers.AutoTokenizer.from_pretrained(base.path)


def _input_digests(base: ModelDir, adapters: list[Adapter]) -> list[str]:
    files = [base.config_path, *base.store.files]
    for a in adapters:
        files += a.files + ([a.path / "adapter_config.json"] if a.path.is_dir() else [])
    return [f"{a.weight}" for a in adapters] + [sha256_file(f) for f in files]


# A model whose fp32 weights fit in this many bytes is referenced by transformers + PEFT itself (loading it goes
# through host memory whole); a larger one by our streamed unmerged forward (validate/layers.py UnmergedSource),
# which tests/validate/test_layers.py proves equal to PEFT's unmerged model for every adapter kind.
PEFT_REFERENCE_MAX_BYTES = 1 << 30


def _device(opts) -> str:
    return "cuda" if opts.device == "cuda" or (opts.device == "auto" and torch.cuda.is_available()) else "cpu"


def reference_kind(base: ModelDir) -> str:
    from lorafast_export.validate.layers import fp32_bytes

    return "peft" if fp32_bytes(base.config, base.store) <= PEFT_REFERENCE_MAX_BYTES else "stream"


def _labels(block: torch.Tensor) -> torch.Tensor:
    return block[1:]


# On a CPU, the transformers + PEFT reference and the greedy decoding run in a worker thread beside the walk and
# the comparisons (Beside); False runs them in line, as on a GPU (the tests compare the two reports).
BESIDE_ON_CPU = True

# Blocks per forward of the PEFT reference, bounded by the logits it returns: on a 2-core CPU, 8 demo blocks in
# one forward took 10.1 s against 33.8 s one at a time, with identical logits (row-wise the same arithmetic).
PEFT_BATCH_BLOCKS = 8
PEFT_BATCH_LOGITS = 1 << 26  # float32 logits elements per forward (256 MiB)


class _Laps:
    """Seconds spent per named sub-step, for the progress lines; on a GPU each lap waits for the device's queued
    work, so a sub-step is charged for its own kernels (the comparisons synchronize once per rows anyway)."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self.spent: dict[str, float] = {}
        self.t = self._now()

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def lap(self, key: str) -> float:
        """Charges the time since the last lap to key; returns that time."""
        now = self._now()
        dt, self.t = now - self.t, now
        self.spent[key] = self.spent.get(key, 0.0) + dt
        return dt

    def __str__(self) -> str:
        return ", ".join(f"{k} {v:.1f} s" for k, v in self.spent.items())


class _Stopped(Exception):
    """Raised in the worker of `Beside` when the main thread failed: its job ends early."""


class Beside:
    """Validation work run beside the main thread on a CPU: one worker thread, jobs in the order submitted.

    On the 2-core CPU the walk and the comparisons leave part of the machine idle (small products, Python between
    them), while building the transformers + PEFT reference (importing peft, loading the model) and greedy
    decoding (small ops, about one core) do too; side by side they share the two cores (bench/VALIDATION.md).
    Each job computes what it computed in line, on its own tensors, so the report does not change. Not threaded
    (validation on a GPU): a job runs in line when it is submitted, as before."""

    def __init__(self, threaded: bool):
        import threading
        from concurrent.futures import ThreadPoolExecutor

        self.threaded = threaded
        self.pool = ThreadPoolExecutor(1, "lf-validate") if threaded else None
        self.stop = threading.Event()

    def submit(self, fn):
        """A getter of fn()'s result (it waits for the job, and raises what the job raised)."""
        if self.pool is None:
            value = fn()
            return lambda: value
        return self.pool.submit(fn).result

    def check(self) -> None:
        """Called by jobs between steps: ends the job once the main thread has failed."""
        if self.stop.is_set():
            raise _Stopped()

    def checked(self, progress):
        """progress for a job: each report is also a check()."""

        def report(msg: str) -> None:
            self.check()
            progress(msg)

        return report

    def close(self, failed: bool) -> None:
        """Waits for the worker (failed: its queued jobs are dropped and the running one stops early)."""
        if self.pool is not None:
            if failed:
                self.stop.set()
            self.pool.shutdown(wait=True, cancel_futures=failed)


# On a CPU, runtime sessions compute their eval logits in the worker (Beside) while the walk runs, up to this many
# bytes of float32 logits held for all of them (the demo: 134 MB per session); beyond it, block by block as
# their comparisons ask for them.
FETCH_LOGITS_BYTES = 256 << 20


def _fetch_session_logits(stages, ids: torch.Tensor, vocab: int, beside) -> dict:
    """{stage: getter of its logits, one [seq - 1, V] float32 tensor per eval block} for the runtime sessions whose
    logits are computed in the worker thread, first in its queue after the reference: with it, the comparisons
    find them ready. Empty when the worker is not threaded. A session is then used by that thread only until the
    getter returns; its greedy decoding comes later."""
    if not beside.threaded:
        return {}
    fetched, budget = {}, FETCH_LOGITS_BYTES
    for st in stages:
        if st.source is not None:
            continue
        size = 4 * ids.shape[0] * (ids.shape[1] - 1) * vocab
        if size > budget:
            continue
        budget -= size

        def run(st=st) -> list[torch.Tensor]:
            out = []
            for b in range(ids.shape[0]):
                beside.check()
                out.append(st.logits(ids[b][None])[0, :-1].float())
            return out

        fetched[st.name] = beside.submit(run)
    return fetched


def _fill_reference_peft(
    reference: Reference, missing, writers, vocab: int, with_base: bool, check=lambda: None
) -> None:
    """Reference logits (and, with_base, the bare base's: adapters disabled) from transformers + PEFT, a few
    blocks per forward, into the cache writers of the entries that are missing (None: the entry is cached).
    check() is called before each forward (it raises to stop)."""
    for es in missing:
        w_ref, w_base = writers[es.name]
        w_base = w_base if with_base else None
        if w_ref is None and w_base is None:
            continue
        seq = len(es.blocks[0])
        step = max(1, min(PEFT_BATCH_BLOCKS, PEFT_BATCH_LOGITS // (seq * vocab)))
        for j0 in range(0, len(es.blocks), step):
            check()
            chunk = es.blocks[j0 : j0 + step]
            batch = torch.stack(chunk)
            ref = reference.logits(batch) if w_ref is not None else None
            base = reference.base_logits(batch) if w_base is not None else None
            for k, block in enumerate(chunk):
                row = (j0 + k) * (seq - 1)
                for w, lg in ((w_ref, ref), (w_base, base)):
                    if w is not None:
                        w.put(row, lg[k, :-1], _labels(block))


_WRITER = {"reference": 0, "base": 1}  # a reference stage of the walk -> its writer in writers[eval set]


def _fill_reference_stream(logits, stages, missing, offsets, writers) -> None:
    """Reference and/or bare-base logits from the streamed walk's final hidden states, into the cache writers of
    the entries that are missing."""
    for es in missing:
        for j, block in enumerate(es.blocks):
            row = j * (len(block) - 1)
            for st in stages:
                w = writers[es.name][_WRITER[st.name]]
                if w is not None:
                    w.put(row, logits.block(st, offsets[es.name] + j), _labels(block))


def _reference_caches(v, opts, kind: str, dtype) -> tuple[ReferenceCache, ReferenceCache]:
    """The reference's cache (keyed by the base, the adapters and the settings) and the bare base's (keyed by the
    base alone, and how its logits are computed): a build of the same base with another adapter, the loop of
    anyone who trains adapters, finds the bare base's entries and runs one forward of the eval tokens fewer."""
    settings = {"block": opts.block_size, "dtype": opts.dtype}
    # the bare base is a float32 stage of our walk, except beside a half-precision PEFT reference (it stays in PEFT)
    base_in = "peft" if kind == "peft" and dtype != torch.float32 else "walk"
    return (
        ReferenceCache(_input_digests(v.base, v.adapters), {**settings, "reference": kind}),
        ReferenceCache(_input_digests(v.base, []), {**settings, "bare_base": base_in}),
    )


def _reference_entries(v, eval_sets, caches, device, dtype, progress, held, beside):
    """{eval set: (ref entry, base entry)} from the caches (None where missing), the eval sets with an entry missing
    and their cache writers ((ref, base), None for an entry that is cached); also the reference stages to add to
    the walk (the streamed reference, the bare base), and the job that fills the entries from a transformers +
    PEFT reference (None when there is none to run; the caller submits it to `beside`). The job takes the PEFT
    model the greedy check left in held["model"], or loads it."""
    from lorafast_export.merge import plan_merge
    from lorafast_export.validate.layers import StoreSource, UnmergedSource
    from lorafast_export.validate.stream import Stage

    ref_cache, base_cache = caches
    vocab = v.base.config.vocab_size
    entries, missing, writers = {}, [], {}
    for es in eval_sets:
        got = (
            ref_cache.open("ref", es.digest(), es.tokens),
            base_cache.open("base", es.digest(), es.tokens),
        )
        entries[es.name] = got
        if None in got:
            missing.append(es)
            writers[es.name] = tuple(
                c.writer(k, es.digest(), es.tokens, vocab) if e is None else None
                for c, k, e in zip((ref_cache, base_cache), ("ref", "base"), got, strict=True)
            )
    need_ref = any(w[0] is not None for w in writers.values())
    need_base = any(w[1] is not None for w in writers.values())
    if need_ref and not need_base:
        progress("bare base: its log-probs cached by an earlier build of this base")
    # the bare base (no reference: only its perplexity is used, for the adapter gain) is a stage of our walk
    # (StoreSource: the checkpoint as stored, in float32), which costs less than a transformers forward; with a
    # half-precision PEFT reference it stays in PEFT, so both perplexities come from the same precision
    base_stage = [Stage("base", StoreSource("base", v.base.config, v.base.store, key="base"))]
    if reference_kind(v.base) == "peft":
        in_walk = dtype == torch.float32
        walked = base_stage if in_walk and need_base else []
        if not (need_ref or (need_base and not in_walk)):
            return entries, missing, writers, walked, None
        progress("reference (transformers + PEFT, unmerged)")

        def fill() -> None:  # takes the model the greedy check loaded before it, if it did
            model = held.pop("model", None) or Reference(v.base, v.adapters, device, dtype)
            _fill_reference_peft(model, missing, writers, vocab, not in_walk, beside.check)

        return entries, missing, writers, walked, fill
    stages = [Stage("reference", UnmergedSource(plan_merge(v.base, v.adapters), "base"))] if need_ref else []
    return entries, missing, writers, stages + (base_stage if need_base else []), None


def _finish(writers, missing, entries) -> None:
    for es in missing:
        entries[es.name] = tuple(
            e if w is None else w.finish() for w, e in zip(writers[es.name], entries[es.name], strict=True)
        )


def _compare(es: EvalSet, first: int, entry, logits, stages, device):
    """Every stage against the cached reference (and the stage before it), block by block."""
    from lorafast_export.validate.metrics import (
        LogProbs,
        MetricAccumulator,
        PerplexityAccumulator,
        rows_per_chunk,
    )

    ref_e, base_e = entry
    vs_ref = {st.name: MetricAccumulator() for st in stages}
    vs_prev = {st.name: MetricAccumulator() for st in stages[1:]}
    ppl_ref, ppl_base = PerplexityAccumulator(), PerplexityAccumulator()
    laps = _Laps(device)
    for j, block in enumerate(es.blocks):
        n = len(block) - 1
        labels, positions = _labels(block).to(device), torch.arange(n, device=device)
        ref, ref_label, ref_argmax = ref_e.rows(j * n, n, device)
        ppl_ref.update_label_logp(ref_label)
        ppl_base.update_label_logp(base_e.rows(j * n, n)[1])
        laps.lap("reference cache reads")
        cands = []  # float32, one runtime call per block and stage
        for st in stages:
            cands.append(logits.block(st, first + j))
            laps.lap(f"{st.name} logits")
        step = rows_per_chunk(ref.shape[-1], device)  # float64 temporaries of bounded size, any vocabulary
        for r in (slice(r0, r0 + step) for r0 in range(0, n, step)):
            # log-probs, probabilities and argmax once per rows and model: each model is compared with the
            # reference and with the next stage
            ref_lp, prev = LogProbs(ref[r], argmax=ref_argmax[r]), None
            for st, lg in zip(stages, cands, strict=True):
                lp = LogProbs(lg[r])
                vs_ref[st.name].update_logprobs(ref_lp, lp, labels[r], positions[r], ref_label[r])
                if prev is not None:
                    vs_prev[st.name].update_logprobs(prev, lp, labels[r], positions[r])
                prev = lp
        laps.lap("comparisons")
    return vs_ref, vs_prev, ppl_ref.ppl, ppl_base.ppl, laps


def _compare_all(eval_sets, offsets, entries, logits, stages, device, fetched, beside, progress) -> dict:
    """_compare of every eval set: {name: its results}. On a CPU the worker takes eval sets from the same queue as
    the main thread once its earlier jobs (the greedy check) are done, where no stage is then used by two threads
    at once (layered stages' heads are pure functions; a session's logits must all have been fetched)."""
    import threading

    queue, lock, results = list(eval_sets), threading.Lock(), {}

    def drain() -> None:
        while True:
            beside.check()
            with lock:
                if not queue:
                    return
                es = queue.pop(0)
            progress(f"eval set {es.name}")
            results[es.name] = _compare(es, offsets[es.name], entries[es.name], logits, stages, device)
            laps = results[es.name][-1]
            progress(
                f"eval set {es.name}: {len(es.blocks)} blocks in {sum(laps.spent.values()):.1f} s ({laps})"
            )

    shareable = all(st.source is not None or st.name in fetched for st in stages)
    helped = beside.submit(drain) if beside.threaded and shareable and len(eval_sets) > 1 else lambda: None
    drain()
    helped()
    return results


def run_validation(v: ValidationInputs, out_dir: Path, progress=lambda m: None):
    """Compute every stage's metrics and write report.json/.md/.html (+ junit) into out_dir."""
    from lorafast_export.report.schema import (
        ArtifactInfo,
        EvalSetInfo,
        LayerError,
        build_report,
        stage_result,
    )
    from lorafast_export.validate.gates import DEFAULT_GATES
    from lorafast_export.validate.greedy import decode_fits
    from lorafast_export.validate.layers import fp32_bytes, stored_bytes
    from lorafast_export.validate.metrics import greedy_agreement
    from lorafast_export.validate.resident import release_resident
    from lorafast_export.validate.stream import Stage, StageLogits, walk

    opts = v.recipe.validate_
    device = _device(opts)
    laps = _Laps(device)
    tok = _tokenizer(v.base)
    specs = [(e.name, Path(e.path)) for e in opts.eval]
    eval_sets = load_eval_sets(tok, specs, opts.block_size, opts.max_tokens)
    prompts = load_prompts(tok, Path(opts.prompts) if opts.prompts else None)
    dtype = TORCH_DTYPES[opts.dtype]
    if dtype != torch.float32 and device == "cpu":
        raise InputError(
            "validate.dtype: a half-precision reference needs a GPU (validate.device cuda); use float32."
        )
    kind = reference_kind(v.base)
    caches = _reference_caches(v, opts, kind, dtype)
    ids = torch.stack([b for es in eval_sets for b in es.blocks])  # every eval block, one walk
    offsets, n = {}, 0
    for es in eval_sets:
        offsets[es.name], n = n, n + len(es.blocks)
    progress(
        f"inputs: {n} eval blocks, {len(prompts)} prompts, tokenized and hashed ({laps.lap('inputs'):.1f} s)"
    )
    progress("reference")
    held = {}  # the PEFT reference the greedy check loads, kept for its logits job (at most 1 GiB of fp32 weights)
    # not with a resident base (a CPU rehearsal of the GPU path): its reads share one staging buffer
    resident = getattr(v.base.store, "resident_on", None) is not None
    beside = Beside(threaded=BESIDE_ON_CPU and torch.device(device).type == "cpu" and not resident)
    try:
        entries, missing, writers, ref_stages, fill = _reference_entries(
            v, eval_sets, caches, device, dtype, progress, held, beside
        )
        stages = [
            Stage(c.name, c.source) if c.source is not None else Stage(c.name, logits=c.logits)
            for c in v.candidates
        ]
        fetched = _fetch_session_logits(stages, ids, v.base.config.vocab_size, beside)  # first in the worker
        # the reference's greedy tokens before the walk, which checks the layered stages against them
        skip = decode_fits(  # the PEFT reference decodes whole; the streamed one on a CPU builds layers each step
            fp32_bytes(v.base.config, v.base.store),
            device,
            stored_bytes(v.base.store) if kind == "stream" else None,
        )
        ref_dir = caches[0].dir  # the reference's greedy tokens are cached beside its logits
        greedy = _reference_tokens(
            v, prompts, opts.max_new_tokens, device, dtype, ref_dir, progress, held, fill is not None, skip
        )
        ref_done = beside.submit(fill) if fill is not None else (lambda: None)
        sessions_greedy = _session_greedy(v, prompts, opts.max_new_tokens, device, progress, beside, skip)
        forced = _forced_blocks(v, prompts, greedy)
        layered = [st.source for st in ref_stages + stages if st.source is not None]
        progress(f"streaming {len(layered)} stages layer by layer on {device}")
        try:
            laps.lap("reference setup")
            hidden = walk(layered, ids, device, progress, forced[0] if forced else None)
            laps.lap("walk")
            if ref_stages:
                ref_logits = StageLogits(ref_stages, hidden, ids, device)
                _fill_reference_stream(ref_logits, ref_stages, missing, offsets, writers)
                ref_logits.close()
                for st in ref_stages:
                    del hidden[st.name]
                names = " and ".join(st.name for st in ref_stages)
                progress(f"{names} logits into the reference cache ({laps.lap('reference cache'):.1f} s)")
            ref_done()
            _finish(writers, missing, entries)
            if missing:
                progress(f"reference cache entries written ({laps.lap('reference cache'):.1f} s)")
        except BaseException:
            beside.close(failed=True)  # nothing writes into the cache entries once they are aborted
            for w in [w for pair in writers.values() for w in pair if w is not None]:
                w.abort()
            raise
        laps.lap("reference")
        logits = StageLogits(stages, hidden, ids, device, fetched)
        progress(f"heads of {len(logits.heads)} stages on {device} ({laps.lap('heads'):.1f} s)")
        if forced:
            greedy.tokens.update(_forced_tokens(forced, logits.heads, greedy.tokens["reference"]))
            progress(
                f"greedy {', '.join(forced[0].stages)}: teacher-forced on the reference's tokens in the walk "
                f"({len(prompts)} prompts, {opts.max_new_tokens} tokens each; {laps.lap('greedy'):.1f} s)"
            )
        # a device-resident base (validate/resident.py) is read by the walk and the heads only: freed before the
        # comparisons and the runtime sessions' greedy decoding
        release_resident(v.base)
        results = _compare_all(eval_sets, offsets, entries, logits, stages, device, fetched, beside, progress)
        infos = []
        for es in eval_sets:
            _, _, ppl_ref, ppl_base, _ = results[es.name]
            infos.append(
                EvalSetInfo(
                    name=es.name,
                    tokens=es.tokens,
                    sequences=len(es.blocks),
                    ppl_ref=ppl_ref,
                    ppl_base=ppl_base,
                )
            )
        logits.close()
        del hidden, logits, fetched
        greedy.tokens.update(sessions_greedy())
    except BaseException:
        beside.close(failed=True)
        raise
    beside.close(failed=False)
    out_stages = []
    for es in eval_sets:
        vs_ref, vs_prev, _, _, _ = results[es.name]
        prev_name = None
        for c in v.candidates:
            out_stages.append(
                stage_result(
                    c.name,
                    es.name,
                    vs_ref[c.name].result(),
                    vs_prev[c.name].result() if c.name in vs_prev else None,
                    prev_name,
                    greedy_agreement(greedy.tokens["reference"], greedy.tokens[c.name])
                    if not greedy.note
                    else None,
                )
            )
            prev_name = c.name
    layer_errors = v.layer_errors
    for c in v.candidates:  # recorded during the walk (QuantizedSource), in the quantized model's order
        recorded = getattr(c.source, "layer_errors", None)
        if layer_errors is None and recorded:
            layer_errors = [recorded[m] for m in c.source.qm.q if m in recorded]
    layer_errors = [LayerError(**e) for e in layer_errors] if layer_errors else None
    note = next((c.note for c in v.candidates if c.name == "artifact" and c.note), None)
    report = build_report(
        ArtifactInfo(
            name=v.artifact_name,
            target=v.target,
            quant=v.quant,
            runtime_note=note,
            validation_note=greedy.note,
        ),
        infos,
        out_stages,
        opts.gates if opts.gates is not None else DEFAULT_GATES,
        layer_errors,
        final_stage="artifact" if any(c.name == "artifact" for c in v.candidates) else None,
    )
    write_reports(report, out_dir, opts.junit)
    return report


def _reference_tokens(
    v: ValidationInputs,
    prompts,
    n: int,
    device: str,
    dtype,
    cache_dir,
    progress,
    held: dict,
    keep: bool,
    skip,
):
    """GreedyResult with the reference's greedy tokens (cached next to its logits, else decoded with a KV cache:
    transformers + PEFT's generate where PEFT is the reference, else our streamed unmerged forward built whole on
    the device), or the note of a skipped check. keep: leave a PEFT model it loads in held["model"] for the
    reference's logits job after it."""
    from lorafast_export.validate.greedy import run_greedy

    ref = _reference_greedy(v, device, dtype, held)
    if keep:
        ref.close = lambda: None
    return run_greedy(ref, [], prompts, n, cache_dir, progress, skip_note=skip)


def _forced_blocks(v: ValidationInputs, prompts, greedy) -> tuple | None:
    """(ExtraBlocks for the walk, spans): every layered stage's greedy check as one teacher-forced forward of the
    prompts followed by the reference's tokens (greedy.teacher_forced_blocks), carried by the walk beside the eval
    blocks; None when the check is skipped or no stage is layered. Runtime sessions decode with their own
    runtime and KV cache instead (_session_greedy), as the reference does."""
    from lorafast_export.validate.greedy import teacher_forced_blocks
    from lorafast_export.validate.stream import ExtraBlocks

    names = tuple(c.name for c in v.candidates if c.source is not None)
    if greedy.note or not names or not prompts:
        return None
    ids, spans = teacher_forced_blocks(prompts, greedy.tokens["reference"])
    return ExtraBlocks(ids, names), spans


def _forced_tokens(forced, heads, ref_tokens) -> dict[str, list[list[int]]]:
    """{layered stage: its greedy tokens (greedy.teacher_forced_tokens)} from the walk's teacher-forced blocks."""
    from lorafast_export.validate.greedy import teacher_forced_tokens

    extra, spans = forced
    out = {}
    for name in extra.stages:
        h = extra.hidden.pop(name)
        out[name] = [
            teacher_forced_tokens(ref, heads[name](h[i, start : start + count]).argmax(-1).tolist())
            for i, ((start, count), ref) in enumerate(zip(spans, ref_tokens, strict=True))
        ]
    return out


def _session_greedy(v: ValidationInputs, prompts, n: int, device: str, progress, beside, skip):
    """A getter of the runtime sessions' greedy tokens ({} when the check is skipped), each decoded by its own
    runtime with its KV cache, batched across the prompts. On a CPU (`beside` threaded) a session that decodes
    with a model of its own (Candidate.decodes_beside_logits) does so in the worker, after its earlier jobs;
    another decodes when the getter is called, after its logits are done (a session is never used from two
    threads). On a GPU every session decodes when the getter is called, after the walk's memory is freed."""
    from lorafast_export.validate.greedy import GreedyStage, stage_tokens

    if skip:
        return dict

    def greedy_stages(cands) -> list[GreedyStage]:
        return [GreedyStage(c.name, lambda ch, k, tick, c=c: c.greedy(ch, k, device, tick)) for c in cands]

    sessions = [c for c in v.candidates if c.source is None]
    worker = [c for c in sessions if beside.threaded and c.decodes_beside_logits]
    after = [c for c in sessions if c not in worker]
    first = (
        beside.submit(lambda: stage_tokens(greedy_stages(worker), prompts, n, beside.checked(progress)))
        if worker
        else dict
    )
    return lambda: {**first(), **stage_tokens(greedy_stages(after), prompts, n, progress)}


def _reference_greedy(v: ValidationInputs, device: str, dtype, held: dict):
    """The reference's decoder, built on first use (a cached reference never loads) and dropped once its tokens
    are done: transformers + PEFT's generate where PEFT is the reference, else our streamed unmerged forward
    built whole on the device."""
    from lorafast_export.validate.greedy import GreedyStage, decoder_greedy_batch, hf_greedy_batch

    def run(prompts, n, tick):
        if "model" not in held:
            if reference_kind(v.base) == "peft":
                held["model"] = Reference(v.base, v.adapters, device, dtype)
            else:
                from lorafast_export.merge import plan_merge
                from lorafast_export.validate.layers import UnmergedSource

                # on a CPU a layer at a time, built again at each step (greedy.decode_fits allowed it)
                on_demand = True if torch.device(device).type == "cpu" else None
                held["model"] = UnmergedSource(plan_merge(v.base, v.adapters), "base").decoder(
                    device, on_demand
                )
        m = held["model"]
        if isinstance(m, Reference):
            return hf_greedy_batch(m.model, prompts, n, device)
        return decoder_greedy_batch(m, prompts, n, tick)

    return GreedyStage("reference", run, close=held.clear)


REPORT_FILES = ("report.json", "report.md", "report.html")


def write_reports(report, out_dir: Path, junit: str | None = None) -> None:
    """report.json/.md/.html and the JUnit file (a path relative to out_dir), all inside out_dir, never through
    a link (out_dir may be a downloaded artifact being re-validated)."""
    from lorafast_export.report.files import write_inside
    from lorafast_export.report.github import append_step_summary
    from lorafast_export.report.html import render_html
    from lorafast_export.report.json_report import to_json
    from lorafast_export.report.junit import render_junit
    from lorafast_export.report.markdown import render_markdown

    files = {  # REPORT_FILES
        "report.json": to_json(report),
        "report.md": render_markdown(report),
        "report.html": render_html(report),
    }
    write_inside(out_dir, files | ({junit: render_junit(report)} if junit is not None else {}))
    append_step_summary(report)


# ---------------------------------------------------------------------------------------------- build stage


def _artifact_candidate(name: str, session) -> Candidate:
    """A target's session; one that can only read the artifact back (hf quantized without its loader,
    trt-llm) offers `layer_source()`, and is then read layer by layer like the other stages."""
    source = session.layer_source() if hasattr(session, "layer_source") else None
    if source is not None:
        return source_candidate(source, getattr(session, "runtime_note", None))
    return session_candidate(name, session)


def _load_device(target_name: str, device: str) -> str:
    """Runtimes that run on the validation device (ours, transformers'); ORT and OpenVINO run on the CPU."""
    return device if target_name in ("torch-compile", "hf") else "cpu"


# Our runtime runs the artifact stage eagerly: compiling changes how the step is scheduled, not its kernels or
# weights, and compiling an 8B-shaped decode step takes ~80 s per shape on an H200 (runtime/engine.py).
TORCH_COMPILE_NOTE = (
    "artifact stage = lorafast-export's runtime on the artifact (same weights and kernels), run eagerly: "
    "torch.compile and CUDA graphs were off for validation"
)


def _load_artifact(target, model_dir: Path, device: str, base: ModelDir, progress=lambda m: None):
    """The target's session for the artifact stage. transformers loads an hf artifact whole through host memory,
    so beyond PEFT_REFERENCE_MAX_BYTES the checkpoint is read back layer by layer instead."""
    t0 = time.perf_counter()
    kw = {"device": _load_device(target.name, device)}
    if target.name == "hf" and reference_kind(base) == "stream":
        kw["whole"] = False
    if target.name == "torch-compile" and kw["device"] == "cuda":  # on a CPU the runtime never compiles
        session = target.load(model_dir, compile="off", **kw)
        session.runtime_note = TORCH_COMPILE_NOTE
    else:
        session = target.load(model_dir, **kw)
    progress(f"artifact loaded into {target.name}'s runtime ({time.perf_counter() - t0:.1f} s)")
    return session


def build_candidates(
    recipe,
    base: ModelDir,
    adapters: list[Adapter],
    merged: ModelDir,
    quantized,
    artifact_dir: Path,
    progress=lambda m: None,
) -> list[Candidate]:
    """merged-fp32 → merged-<dtype> (if the checkpoint is not fp32) → quantized (if any) → artifact.
    quantized: the quantize stage's QuantizedModel, or None."""
    from lorafast_export.merge import plan_merge
    from lorafast_export.merge.stream import MergedStore
    from lorafast_export.targets.registry import get_target
    from lorafast_export.validate.layers import MergedSource, QuantizedSource, StoreSource

    plan = plan_merge(base, adapters)
    cands = [merged_fp32_candidate(plan)]
    dtypes = {merged.store.dtype_of(k) for k in merged.store.keys()[:8]}  # from headers: a view would merge
    if dtypes != {torch.float32}:
        name = "merged-" + SHORT_NAMES.get(next(iter(dtypes)), "weights")
        if isinstance(merged.store, MergedStore):  # merges on read: round the device merge the same way
            src = MergedSource(name, plan, "base", merged.store.dtype or "base")
        else:  # the written checkpoint, read back layer by layer
            src = StoreSource(name, merged.config, merged.store)
        cands.append(source_candidate(src))
    if quantized is not None:  # weight errors against the merged weights, as the checkpoint dtype rounds them
        ref = MergedSource("merged", plan, "base", merged.store.dtype or "base")
        cands.append(source_candidate(QuantizedSource("quantized", quantized, ref)))
    target = get_target(recipe.target.name)
    device = _device(recipe.validate_)
    cands.append(
        _artifact_candidate(
            "artifact", _load_artifact(target, artifact_dir / "model", device, base, progress)
        )
    )
    # Informational: the runtime at its own default precision (e.g. OpenVINO's bf16 + u8 KV cache on CPUs that
    # have bf16), so users see what the default costs. Gates apply to "artifact", not to this stage.
    if "precision" in inspect.signature(target.load).parameters:
        cands.append(
            session_candidate(
                "artifact-runtime-default", target.load(artifact_dir / "model", precision="default")
            )
        )
    return cands


def quant_label(recipe) -> str:
    if recipe.quant.method == "none":
        return "none"
    from lorafast_export.quant.config import resolve_quant

    qc = resolve_quant(recipe.quant)
    g = "pc" if qc.group_size == -1 else f"g{qc.group_size}"
    return f"{qc.method}-w{qc.bits}-{g}"


def validate_build(
    recipe,
    base: ModelDir,
    adapters: list[Adapter],
    merged: ModelDir,
    quantized,
    artifact_dir: Path,
    progress=lambda m: None,
) -> dict:
    """The build's validate stage (pipeline.validate_stage): writes reports into the (staging) artifact
    directory; returns a summary. quantized: the quantize stage's QuantizedModel, or None."""
    from lorafast_export.report.markdown import render_markdown
    from lorafast_export.validate.resident import resident

    # on a GPU with room the base is read once and kept there (validate/resident.py)
    with resident(base, adapters, _device(recipe.validate_), progress) as (base, adapters):
        v = ValidationInputs(
            base,
            adapters,
            recipe,
            build_candidates(recipe, base, adapters, merged, quantized, artifact_dir, progress),
            recipe.name,
            recipe.target.name,
            quant_label(recipe),
            None,  # the quantized stage records its per-layer weight errors during the walk
        )
        report = run_validation(v, artifact_dir, progress)
    return summarize(report) | {"markdown_table": render_markdown(report)}


def validate_artifact(artifact: Path, overrides: dict, progress=lambda m: None):
    """Re-validate an existing artifact against its inputs (from its manifest); reports go into the artifact."""
    from lorafast_export.adapters import open_adapter
    from lorafast_export.manifest import locate_inputs, read_manifest, record_files, recorded_recipe
    from lorafast_export.merge import plan_merge
    from lorafast_export.paths import resolve_path
    from lorafast_export.recipe import Recipe
    from lorafast_export.targets.registry import require_available
    from lorafast_export.validate.resident import resident
    from lorafast_export.weights import open_model

    man_path = artifact / "manifest.json"
    man = read_manifest(artifact, old_ok=True)
    data = recorded_recipe(man, artifact)
    if isinstance(
        data.get("validate"), dict
    ):  # where this run writes JUnit is --junit's choice, not the build's
        data["validate"].pop("junit", None)
    recipe = Recipe.from_dict(locate_inputs(data, man, artifact), str(man_path))
    recipe = recipe.with_overrides(overrides) if overrides else recipe
    check_recipe_gates(recipe, revalidate=True)
    base = open_model(resolve_path(recipe.inputs.base), recipe.inputs.allow_pickle)
    adapters = [
        open_adapter(f"{resolve_path(a.path)}:{a.weight}", recipe.inputs.allow_pickle, a.overrides())
        for a in recipe.inputs.adapters
    ]
    target = require_available(recipe.target.name)
    device = _device(recipe.validate_)
    with resident(base, adapters, device, progress) as (base, adapters):  # as in validate_build
        session = _load_artifact(target, artifact / "model", device, base, progress)
        cands = [merged_fp32_candidate(plan_merge(base, adapters)), _artifact_candidate("artifact", session)]
        v = ValidationInputs(
            base, adapters, recipe, cands, recipe.name, recipe.target.name, quant_label(recipe)
        )
        report = run_validation(v, artifact, progress)
    # the reports were rewritten: their new hashes go into the manifest, so the artifact still verifies
    record_files(artifact, [*REPORT_FILES, *([recipe.validate_.junit] if recipe.validate_.junit else [])])
    return report


def summarize(report) -> dict:
    final = [s for s in report.stages if s.name == report.stages[-1].name]
    return {
        "passed": report.passed,
        "summary": {
            s.eval_set: {
                "kl_mean": s.kl_mean,
                "top1": s.top1,
                "ppl_ratio": s.ppl_ratio,
                "greedy_match": s.greedy_match,
            }
            for s in final
        },
        "gates": [{"expr": g.expr, "value": g.value, "passed": g.passed} for g in report.gates],
    }
