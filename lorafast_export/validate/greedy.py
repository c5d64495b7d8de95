"""The greedy-generation check: every stage's greedy continuation of the prompts against the reference's.

The reference decodes the prompts together (left-padded, one batch per `batch_size` prompts) with a KV cache, on
the validation device: transformers' `generate` on the unmerged PEFT model, or our streamed unmerged forward built
whole. Its tokens are cached next to its logits, so a second build against the same inputs does not decode them
again. A runtime session (ONNX Runtime, OpenVINO, our torch-compile runtime) decodes with its own generation
client and KV cache (`generate_batch`, or `generate` prompt by prompt): what is shipped is what is checked.

A layered stage (merged, quantized, an artifact read back: validate/layers.py) is checked by teacher forcing
instead of its own decoding loop: the prompts followed by the reference's tokens go through the layer-streamed
walk with the eval blocks (`teacher_forced_blocks`), and its argmax at each of those positions gives its greedy
continuation up to its first disagreement with the reference (`teacher_forced_tokens`), which is all the greedy
metrics (exact match, first divergence) read. No whole model of the stage is built, and its layers are built
once for the eval blocks and the prompts together.

The reference's decoding holds a whole model on one device for `max_new_tokens` steps, except on a CPU beyond
`HOST_DECODE_MAX_BYTES` of fp32 weights: there our streamed unmerged reference builds each layer again from the
checkpoint at every step (`LayerSource.decoder(on_demand=True)`: one layer's fp32 weights at a time, the
checkpoint re-read from the page cache), up to `HOST_STREAM_DECODE_MAX_BYTES` of stored weights and half the
memory available. Where that does not fit either (a model larger than that on a CPU-only machine; a GPU without
room for the fp32 model), the check is skipped and `GreedyResult.note` says why: the report shows the note and no
greedy numbers, instead of hours of decoding.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# A whole fp32 model is held on the host for decoding only up to this size (about 250M parameters): beyond it, a
# CPU-only validation keeps its memory to a few layers (issue 13), and the reference decodes with its layers built
# at every step from the checkpoint, whose stored bytes are then re-read each step: up to this many (a 4B model in
# 16 bits; the TinyLlama-1.1B shape's 2.2 GB took 1.9 s a step on the 2-core machine, bench/VALIDATION.md)
# and half the host's available memory (so the page cache holds them); beyond, the check is skipped with a note.
HOST_DECODE_MAX_BYTES = 1 << 30
HOST_STREAM_DECODE_MAX_BYTES = 8 << 30
# On a GPU, the share of free memory a decoding model (weights + KV cache + activations) may take.
GPU_DECODE_SHARE = 0.85
PROGRESS_EVERY_S = 5.0

Progress = Callable[[str], None]


@dataclass
class GreedyResult:
    tokens: dict[str, list[list[int]]] = field(default_factory=dict)  # "reference" and stage -> new tokens
    note: str | None = None  # set when the check was skipped: why


def _available_bytes() -> int | None:
    """The host's available memory (Linux's MemAvailable), or None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def host_stream_budget() -> int:
    """Stored checkpoint bytes a CPU-only validation re-reads at every step of the reference's decoding."""
    avail = _available_bytes()
    return HOST_STREAM_DECODE_MAX_BYTES if avail is None else min(HOST_STREAM_DECODE_MAX_BYTES, avail // 2)


def decode_fits(model_bytes: int, device: str, stored_bytes: int | None = None) -> str | None:
    """None when a model of `model_bytes` (in fp32, as it would sit on `device`) can be decoded there, else the
    reason. stored_bytes: the checkpoint's own size, where the reference can decode on a CPU with its layers built
    at every step (the streamed reference); None where it decodes as a whole model only."""
    if device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        if model_bytes <= GPU_DECODE_SHARE * free:
            return None
        return (
            f"greedy check skipped: the model needs {model_bytes / 1e9:.1f} GB for decoding and the GPU has "
            f"{free / 1e9:.1f} GB free."
        )
    if model_bytes <= HOST_DECODE_MAX_BYTES:
        return None
    if stored_bytes is None:
        return (
            f"greedy check skipped: decoding holds a whole model ({model_bytes / 1e9:.1f} GB in fp32), more than "
            f"the {HOST_DECODE_MAX_BYTES / 2**30:.0f} GiB a CPU-only validation allows; validate on a GPU "
            "(validate.device cuda) to run it."
        )
    budget = host_stream_budget()
    if stored_bytes <= budget:
        return None
    return (
        f"greedy check skipped: decoding on the CPU re-reads the whole checkpoint ({stored_bytes / 1e9:.1f} GB) at "
        f"every step, more than the {budget / 1e9:.1f} GB this validation allows (at most "
        f"{HOST_STREAM_DECODE_MAX_BYTES / 2**30:.0f} GiB and half the available memory); validate on a GPU "
        "(validate.device cuda) to run it."
    )


def teacher_forced_blocks(
    prompts: Sequence[Sequence[int]], ref_tokens: Sequence[Sequence[int]], pad_id: int = 0
) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """The blocks that check a layered stage's greedy decoding in one forward: prompt i followed by the reference's
    new tokens but the last, right-padded (a causal model's positions before the padding do not see it), and per
    prompt (first position, count): the positions whose logits predict the reference's new tokens."""
    seqs = [list(p) + list(r[:-1]) for p, r in zip(prompts, ref_tokens, strict=True)]
    ids = torch.full((len(seqs), max(len(q) for q in seqs)), pad_id, dtype=torch.long)
    spans = []
    for i, (q, p, r) in enumerate(zip(seqs, prompts, ref_tokens, strict=True)):
        ids[i, : len(q)] = torch.tensor(q, dtype=torch.long)
        spans.append((len(p) - 1, len(r)))
    return ids, spans


def teacher_forced_tokens(ref: Sequence[int], argmax: Sequence[int]) -> list[int]:
    """A stage's greedy continuation as far as the reference's tokens determine it, from its argmax at each
    position of the reference's continuation (teacher forcing): while they agree, its greedy decoding is fed the
    same tokens as the reference's, so its continuation is the reference's up to the first disagreement k and
    its token at k is argmax[k]; beyond k it would see other tokens, and the continuation stops there. For the
    greedy metrics (exact match, first divergence) this equals its own decoding of max_new_tokens tokens."""
    for k, (a, b) in enumerate(zip(ref, argmax, strict=True)):
        if a != b:
            return [*ref[:k], b]
    return list(ref)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [b, t] and attention mask [b, t] (1 = real token), padded on the left."""
    t = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), t), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), t), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, t - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[i, t - len(p) :] = 1
    return ids, mask


def _forward(decs, ids, pasts, position_ids, attention_mask):
    """Decoder.forward of each decoder on its ids (only the last position's logits), except that in the
    prefill a padding query may see itself: a row with no allowed key would make SDPA return NaN, and a NaN
    value times a zero weight still poisons the real tokens. Layer i of every decoder is built (layers.
    BuiltDecoder.layer_at) from one `shared` dict, so what several of them derive alike is computed once."""
    hs, ropes = [], []
    for dec, x, past in zip(decs, ids, pasts, strict=True):
        past_len = past[0][0].shape[2] if past else 0
        h = dec.embed(x)
        cos, sin, mask = dec.rope_and_mask(x, past_len, position_ids, attention_mask, h.dtype)
        if past_len == 0:
            mask = mask | torch.eye(x.shape[1], dtype=torch.bool, device=x.device)
        hs.append(h)
        ropes.append((cos, sin, mask))
    presents = [[] for _ in decs]
    for i in range(len(decs[0].model.layers)):
        shared: dict = {}
        for k, (dec, past) in enumerate(zip(decs, pasts, strict=True)):
            layer = _layer_at(dec, i, shared)
            hs[k], kv = layer(hs[k], *ropes[k], past[i] if past else None)
            presents[k].append(kv)
            del layer
    return [dec.logits(h[:, -1:]) for dec, h in zip(decs, hs, strict=True)], presents


def _layer_at(dec, i: int, shared: dict):
    """Layer i of a decoder: built now from `shared` where the decoder builds its layers on demand."""
    layer_at = getattr(dec, "layer_at", None)
    return layer_at(i, shared) if layer_at is not None else dec.model.layers[i]


@torch.no_grad()
def decoder_greedy_batch(
    dec, prompts: Sequence[Sequence[int]], max_new_tokens: int, tick=None
) -> list[list[int]]:
    """Greedy continuations of `prompts` (new tokens only) in one batch, with the decoder's KV cache, on the
    device the decoder's weights are on. tick(t) is called after each new token."""
    return joint_greedy_batch([dec], prompts, max_new_tokens, tick)[0]


@torch.no_grad()
def joint_greedy_batch(
    decs: Sequence, prompts: Sequence[Sequence[int]], max_new_tokens: int, tick=None
) -> list[list[list[int]]]:
    """decoder_greedy_batch of several decoders in lockstep, one list of continuations per decoder. Decoders
    that build their layers at each step from device-resident tensors (merged-fp32, merged-bf16) build layer i
    from one shared dict, so the fp32 merge both start from is computed once per layer and token, not once per
    stage. Each decoder runs on its own batch and KV cache exactly the operations it runs alone: same tokens."""
    device = decs[0].model.embed_tokens.weight.device
    ids, mask = left_pad(prompts)
    ids, mask = ids.to(device), mask.to(device)
    pos = (mask.cumsum(-1) - 1).clamp_min(0)  # real tokens at 0..len-1, as when decoded alone
    logits, pasts = _forward(decs, [ids] * len(decs), [None] * len(decs), pos, mask)
    out: list[list[torch.Tensor]] = [[] for _ in decs]
    for t in range(max_new_tokens):
        nxt = [lg[:, -1].argmax(-1) for lg in logits]  # [b] per decoder
        for k, x in enumerate(nxt):
            out[k].append(x)
        if tick:
            tick(t + 1)
        if t + 1 == max_new_tokens:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        pos = pos[:, -1:] + 1
        logits, pasts = _forward(decs, [x[:, None] for x in nxt], pasts, pos, mask)  # each its own tokens
    return [torch.stack(o, dim=1).tolist() for o in out]


@torch.no_grad()
def hf_greedy_batch(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, device) -> list[list[int]]:
    """transformers' generate (here: the unmerged PEFT reference), left-padded batch, exactly max_new_tokens."""
    ids, mask = left_pad(prompts)
    out = model.generate(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=0,
    )
    return out[:, ids.shape[1] :].tolist()


def batched(
    name: str,
    fn: Callable[[list[list[int]], Callable[[int], None]], list[list[int]]],
    prompts: list[list[int]],
    max_new_tokens: int,
    batch_size: int,
    progress: Progress,
) -> list[list[int]]:
    """Run fn over prompt batches, reporting 'greedy NAME: prompts i-j/n, token t/T' at most every few seconds
    and at the end of each batch."""
    out: list[list[int]] = []
    n, t0 = len(prompts), time.perf_counter()
    for start in range(0, n, batch_size):
        chunk = prompts[start : start + batch_size]
        span = f"prompts {start + 1}-{start + len(chunk)}/{n}"
        b0 = time.perf_counter()
        last, first = [b0], []

        def tick(t: int, span=span, last=last, first=first, b0=b0) -> None:
            if not first:  # the first token: the prompts' forward (a built decoder: with its layers' build)
                first.append(time.perf_counter() - b0)
            if time.perf_counter() - last[0] >= PROGRESS_EVERY_S:
                last[0] = time.perf_counter()
                progress(f"greedy {name}: {span}, token {t}/{max_new_tokens}")

        out += fn(chunk, tick)
        split = (
            f"; first token {first[0]:.1f} s, then {time.perf_counter() - b0 - first[0]:.1f} s"
            if first
            else ""
        )
        progress(
            f"greedy {name}: {span}, {max_new_tokens} tokens each ({time.perf_counter() - t0:.1f} s{split})"
        )
    return out


# ----------------------------------------------------------------------------------- reference token cache


def _cache_path(cache_dir: Path, prompts: list[list[int]], max_new_tokens: int) -> Path:
    h = hashlib.sha256(json.dumps({"prompts": prompts, "new": max_new_tokens}).encode()).hexdigest()
    return Path(cache_dir) / f"greedy-{h[:16]}.json"


def load_reference_tokens(cache_dir: Path, prompts, max_new_tokens: int) -> list[list[int]] | None:
    p = _cache_path(cache_dir, prompts, max_new_tokens)
    try:
        toks = json.loads(p.read_text())["tokens"]
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, KeyError, TypeError) as e:  # a damaged entry is recomputed, not fatal
        log.warning("greedy cache %s unreadable (%s); recomputing", p, e)
        return None
    ok = len(toks) == len(prompts) and all(len(t) == max_new_tokens for t in toks)
    return toks if ok else None


def save_reference_tokens(cache_dir: Path, prompts, max_new_tokens: int, tokens: list[list[int]]) -> None:
    p = _cache_path(cache_dir, prompts, max_new_tokens)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps({"tokens": tokens}))
    tmp.replace(p)


# ------------------------------------------------------------------------------------------ orchestration


@dataclass
class GreedyStage:
    """How to get one stage's greedy tokens: `run(prompts, max_new_tokens, tick)`, already batched."""

    name: str
    run: Callable[[list[list[int]], int, Callable[[int], None]], list[list[int]]]
    close: Callable[[], None] = lambda: None  # frees what run built, once every batch is done


def run_greedy(
    reference: GreedyStage,
    stages: Sequence[GreedyStage],
    prompts: list[list[int]],
    max_new_tokens: int,
    cache_dir: Path | None,
    progress: Progress = lambda m: None,
    batch_size: int = 32,
    skip_note: str | None = None,
) -> GreedyResult:
    """The reference's tokens (cached) and every stage's; skipped with skip_note when that is set."""
    if skip_note:
        progress(skip_note)
        return GreedyResult(note=skip_note)
    res = GreedyResult()
    ref = load_reference_tokens(cache_dir, prompts, max_new_tokens) if cache_dir else None
    if ref is None:
        ref = batched(
            reference.name,
            lambda ch, tick: reference.run(ch, max_new_tokens, tick),
            prompts,
            max_new_tokens,
            batch_size,
            progress,
        )
        reference.close()
        if cache_dir:
            save_reference_tokens(cache_dir, prompts, max_new_tokens, ref)
    else:
        progress(f"greedy {reference.name}: {len(prompts)} prompts from the cache")
    res.tokens["reference"] = ref
    res.tokens.update(stage_tokens(stages, prompts, max_new_tokens, progress, batch_size))
    return res


def stage_tokens(
    stages: Sequence[GreedyStage],
    prompts: list[list[int]],
    max_new_tokens: int,
    progress: Progress = lambda m: None,
    batch_size: int = 32,
) -> dict[str, list[list[int]]]:
    """Every stage's greedy tokens, one stage after another (each closed once its batches are done)."""
    out = {}
    for st in stages:
        out[st.name] = batched(
            st.name,
            lambda ch, tick, st=st: st.run(ch, max_new_tokens, tick),
            prompts,
            max_new_tokens,
            batch_size,
            progress,
        )
        st.close()
    return out
