"""The quantize stage: `quantize_checkpoint(merged, options) -> QuantizedModel`, streamed by layer.

    calibration ids ─▶ embed ─▶ for each decoder layer i:
        read layer i's tensors (one by one) ─▶ quantize it with the method, feeding it the outputs of
        the already-quantized layers 0..i-1 ─▶ its quantized outputs become layer i+1's inputs ─▶ drop it
    ─▶ final norm + lm_head (quantized only with quantize_lm_head)

Peak memory is one layer (float32, on the compute device) plus the calibration activations
[samples, seq_len, hidden]. Finished layers are kept on the CPU, or with out_dir written to disk as each one
finishes (the build always spills: its quantize stage lives in the stage cache). Data-free methods (rtn, int8)
skip calibration entirely. What each method does inside a layer: quant/methods.py.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from lorafast_export.dtypes import all_finite
from lorafast_export.errors import InputError
from lorafast_export.model.decoder import DecoderLayer, RMSNorm, Rotary, causal_mask
from lorafast_export.model.quantized import QuantizedModel, QuantizedWriter, load_quantized
from lorafast_export.model.spec import EMBED, FINAL_NORM, LM_HEAD, ModelConfig, layer_prefix
from lorafast_export.qform import QTensor
from lorafast_export.quant.blocks import (
    HEAD_GROUPS,
    LAYER_GROUPS,
    Block,
    Head,
    causal_kernel,
    compute_dtype,
    screen_dtype,
)
from lorafast_export.quant.calib import load_calibration
from lorafast_export.quant.config import QuantConfig, resolve_quant
from lorafast_export.quant.methods import METHODS, Method, get_method
from lorafast_export.recipe import QuantOptions
from lorafast_export.weights import ModelDir, open_model

__all__ = ["METHODS", "quantize_checkpoint", "resolve_device"]

log = logging.getLogger(__name__)
PREFETCH_DEVICES = ("cuda",)  # where _LayerReader reads the next layer while this one is quantized
Progress = Callable[[str], None]
Observer = Callable[[int, torch.Tensor], None]


def quantize_checkpoint(
    merged: str | Path | ModelDir,
    options: QuantConfig | QuantOptions | dict,
    progress: Progress | None = None,
    *,
    calib_ids: torch.Tensor | None = None,
    observe: Observer | None = None,
    out_dir: str | Path | None = None,
) -> QuantizedModel:
    """Quantize the merged model (an HF checkpoint directory, or a ModelDir such as the merge stage's lazy view)
    with the method's config (a QuantConfig, or recipe quant options resolved by quant.config.resolve_quant),
    one decoder layer at a time.

    out_dir: spill each finished layer there (model/quantized.py's layout) and return a lazy view of it, so the
    codes never sit in RAM together; None keeps everything in memory (small models, tests).
    calib_ids [samples, seq_len] replaces the tokenized calibration files (tests, benchmarks);
    observe(i, x) sees the activations entering layer i (i = num_layers: the lm_head block).
    """
    qc = options if isinstance(options, QuantConfig) else resolve_quant(options)
    method = get_method(qc.method)
    md = merged if isinstance(merged, ModelDir) else open_model(merged)
    cfg = md.config
    check_settings(cfg, qc)
    device = resolve_device(qc.device)
    progress = progress or (lambda msg: None)
    with _Sink(out_dir) as sink, _LayerReader(md.store, cfg, device) as reader, _tf32_on(device):
        walked = _walk(md, cfg, method, qc, device, progress, calib_ids, observe, sink, reader)
    return sink.finish(cfg, {**qc.record(), **walked.record()})


@dataclass
class BlockResult:
    """One quantized block: its QTensors and remaining fp tensors (checkpoint names), and what the method
    skipped in it (note → where)."""

    q: dict[str, QTensor] = field(default_factory=dict)
    fp: dict[str, torch.Tensor] = field(default_factory=dict)
    notes: dict[str, list[str]] = field(default_factory=dict)


@dataclass(frozen=True)
class WalkResult:
    """What the walk measured, recorded in the quantized form's settings beside the config."""

    calib_tokens: int
    device_used: str
    time_s: float
    notes: dict[str, list[str]]  # what a method skipped → the blocks where

    def record(self) -> dict:
        return {
            "calib_tokens": self.calib_tokens,
            "device_used": self.device_used,
            "time_s": self.time_s,
            "notes": [f"{n} ({len(w)} blocks)" for n, w in self.notes.items()],
        }


class _Sink:
    """Where finished layers go: kept in memory, or written to out_dir as parts (QuantizedWriter).

    A part is packed and written on one background thread while the walk goes on with the next layer (at 8B a
    layer's codes are 218 MB to pack and write); at most one write is in flight, so the parts keep their order
    and memory holds at most one finished layer more. The finiteness check runs before, on the caller's thread."""

    def __init__(self, out_dir: str | Path | None):
        self.writer = None if out_dir is None else QuantizedWriter(out_dir)
        self.pool = None if self.writer is None else ThreadPoolExecutor(1, "lf-part-write")
        self.pending: Future | None = None
        self.q: dict = {}
        self.fp: dict[str, torch.Tensor] = {}

    def __enter__(self) -> _Sink:
        return self

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)

    def add(self, q: dict, fp: dict) -> None:
        check_finite_outputs(q, fp)
        if self.writer is not None:
            self._wait()
            self.pending = self.pool.submit(self.writer.add, q, fp)
        else:
            self.q.update(q)
            self.fp.update(fp)

    def _wait(self) -> None:
        """The write in flight, finished (its error, if any, raised here)."""
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending.result()

    def finish(self, cfg: ModelConfig, settings: dict) -> QuantizedModel:
        if self.writer is not None:
            self._wait()
            return load_quantized(self.writer.finish(cfg, settings))
        return QuantizedModel(config=cfg, fp=self.fp, q=self.q, settings=settings)


def check_finite_outputs(q: dict, fp: dict) -> None:
    """NaN/Inf never reaches a quantized checkpoint: every scale, bias and kept float tensor is checked."""
    floats = list(fp.items())
    for name, qt in q.items():
        floats += [(f"{name}.{f}", getattr(qt, f)) for f in ("scales", "bias", "input_scale")]
    for name, t in floats:
        if t is not None and not all_finite(t):
            raise InputError(
                f"quantization produced NaN/Inf in {name}; nothing was published. The merged weights were "
                "finite, so the values overflowed while quantizing (calibration activations or scales out of "
                "the float range): check the calibration text and the adapter's scale (lora_alpha)."
            )


@contextmanager
def _tf32_on(device: torch.device):
    """On CUDA, float32 matmuls on tensor cores (TF32) for the walk; the previous setting is restored."""
    before = torch.get_float32_matmul_precision()
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def _walk(
    md,
    cfg: ModelConfig,
    method: Method,
    qc: QuantConfig,
    device,
    progress: Progress,
    calib_ids,
    observe,
    sink: _Sink,
    reader: _LayerReader,
) -> WalkResult:
    """Quantize every layer into sink (read through reader)."""
    fp_dtype = md.store.dtype_of(EMBED)
    t0 = time.perf_counter()

    x = None
    embed = md.store.get(EMBED)  # read once (1 GB at 8B): the lookup and the sink share it
    if method.calibrated:
        ids = calib_ids if calib_ids is not None else load_calibration(md.path, qc.calib)
        _check_ids(ids, cfg)
        # looked up on the compute device (exact either way): 128 x 2048 tokens embed in seconds on the CPU
        x = F.embedding(ids.to(device), embed.to(device)).float()  # [n, s, h]
    rope = _rope_and_mask(cfg, x, device)
    sink.add({}, {EMBED: embed})
    del embed
    notes: dict[str, list[str]] = {}
    calib_tokens = 0 if x is None else int(x.shape[0] * x.shape[1])
    for i in range(cfg.num_layers):
        x = _walk_layer(reader, cfg, i, method, qc, x, rope, device, fp_dtype, observe, sink, notes)
        progress(f"layer {i + 1}/{cfg.num_layers} quantized ({qc.method})")
        log.debug("layer %d done at %.1fs", i, time.perf_counter() - t0)
    if observe is not None and x is not None and qc.quantize_lm_head:
        observe(cfg.num_layers, x)
    done = _head(md.store, cfg, method, qc, x, device, fp_dtype)
    sink.add(done.q, done.fp)
    _merge_notes(notes, done.notes)
    for note, where in notes.items():
        log.warning("%s in %d block(s)", note, len(where))
    return WalkResult(calib_tokens, str(device), round(time.perf_counter() - t0, 3), notes)


def _walk_layer(reader, cfg, i, method, qc, x, rope, device, fp_dtype, observe, sink, notes):
    """Quantize decoder layer i into sink; its quantized outputs (the next layer's inputs), or None."""
    if observe is not None and x is not None:
        observe(i, x)
    block = _layer_block(reader.layer(i), cfg, x, rope, device, fp_dtype)
    done = _quantize_block(method, block, qc, layer_prefix(i))
    x = None if x is None else block.run()  # the quantized layer's outputs feed the next layer
    sink.add(done.q, done.fp)
    _merge_notes(notes, done.notes)
    return x


class _LayerReader:
    """Decoder layer i's tensors (relative names), float32 on the compute device.

    On the CPU: read one by one when asked (peak memory: one layer). On CUDA, the host work is taken off the walk's
    critical path: layer i+1 is read on one background thread (store.get: a disk read, and for the build's
    merge-on-read store the LoRA merge on the CPU) into pinned memory while layer i is quantized; it is then
    copied in its stored dtype (bf16: half the bytes of float32) asynchronously and widened to float32 on the
    GPU. Widening is exact on either side, so the walk sees the same values as the CPU path. Host memory: one
    more layer in pinned buffers. Layer 0's read starts as the reader is made, before the calibration set-up."""

    def __init__(self, store, cfg: ModelConfig, device: torch.device):
        self.store, self.device, self.n = store, device, cfg.num_layers
        with torch.device("meta"):
            self.names = list(DecoderLayer(cfg).state_dict())
        prefetch = device.type in PREFETCH_DEVICES
        self.pool = ThreadPoolExecutor(1, "lf-layer-read") if prefetch else None
        self.pending: dict[int, Future] = {}
        if (
            self.pool is not None and self.n
        ):  # layer 0 is read while the calibration is tokenized and embedded
            self.pending[0] = self.pool.submit(self._host, 0)

    def __enter__(self) -> _LayerReader:
        return self

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            for f in self.pending.values():
                f.cancel()
            self.pool.shutdown(wait=True)

    def _host(self, i: int) -> dict[str, torch.Tensor]:
        prefix = layer_prefix(i)
        pin = self.device.type == "cuda"
        return {k: (_pinned(t) if pin else t) for k in self.names for t in [self.store.get(prefix + k)]}

    def layer(self, i: int) -> dict[str, torch.Tensor]:
        if self.pool is None:
            prefix = layer_prefix(i)
            return {k: self.store.get(prefix + k).to(self.device, torch.float32) for k in self.names}
        host = self.pending.pop(i, None) or self.pool.submit(self._host, i)
        if i + 1 < self.n:
            self.pending[i + 1] = self.pool.submit(self._host, i + 1)
        return {k: t.to(self.device, non_blocking=True).float() for k, t in host.result().items()}


def _pinned(t: torch.Tensor) -> torch.Tensor:
    """t in pinned host memory, or t itself where pinning fails (the copy is then a synchronous one, as before)."""
    try:
        return t.pin_memory()
    except RuntimeError as e:
        log.warning("cannot pin %s bytes of host memory (%s); copying from pageable memory", t.nbytes, e)
        return t


def _merge_notes(into: dict[str, list[str]], new: dict[str, list[str]]) -> None:
    for note, where in new.items():
        into.setdefault(note, []).extend(where)


def _quantize_block(method: Method, block: Block, qc: QuantConfig, prefix: str) -> BlockResult:
    """Quantize the block in place; its QTensors and its remaining fp tensors, under checkpoint names."""
    out = BlockResult()
    for name, qt in method.quantize_block(block, qc).items():
        out.q[prefix + name] = qt
    for name, p in block.module.named_parameters():  # norms (folded) and anything left unquantized
        out.fp[prefix + name] = p.detach().to(block.fp_dtype).cpu()
    for note in block.notes:
        out.notes.setdefault(note, []).append(prefix.rstrip(".") or "lm_head")
    return out


def _head(store, cfg: ModelConfig, method: Method, qc: QuantConfig, x, device, fp_dtype) -> BlockResult:
    """The final norm + lm_head: kept as they are, or (quantize_lm_head) quantized as one more block."""
    head_weight = EMBED if cfg.tie_word_embeddings else LM_HEAD
    if not qc.quantize_lm_head:
        fp = {FINAL_NORM: store.get(FINAL_NORM)}
        if not cfg.tie_word_embeddings:
            fp[LM_HEAD] = store.get(LM_HEAD)
        return BlockResult(fp=fp)
    norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
    norm.weight = torch.nn.Parameter(store.get(FINAL_NORM).float(), requires_grad=False)
    lm_head = torch.nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False, device="meta")
    lm_head.weight = torch.nn.Parameter(store.get(head_weight).float(), requires_grad=False)
    block = Block(
        Head(norm, lm_head).to(device),
        HEAD_GROUPS,
        x,
        lambda m, xc: m(xc),
        chunk=_chunk(cfg, x, device, width=cfg.vocab_size),
        fp_dtype=fp_dtype,
        screen_dtype=screen_dtype(device),
    )
    done = _quantize_block(method, block, qc, "")
    done.fp[FINAL_NORM] = done.fp.pop("norm.weight")
    return done


def _layer_block(state: dict[str, torch.Tensor], cfg: ModelConfig, x, rope, device, fp_dtype) -> Block:
    """A decoder layer from its tensors (float32 on device, _LayerReader); its forward passes run under
    compute_dtype(device) autocast (bf16 on CUDA, float32 on the CPU)."""
    with torch.device("meta"):
        layer = DecoderLayer(cfg)
    layer.load_state_dict(state, strict=True, assign=True)
    layer.requires_grad_(False)
    cos, sin, mask = rope
    causal = x is not None and mask is None  # _rope_and_mask left the masking to SDPA's causal kernel
    return Block(
        layer,
        LAYER_GROUPS,
        x,
        lambda m, xc: m(xc, cos, sin, mask, None, causal)[0],
        sub_args={"self_attn": (cos, sin, mask, None, causal)},
        chunk=_chunk(cfg, x, device),
        fp_dtype=fp_dtype,
        compute_dtype=compute_dtype(device),
        screen_dtype=screen_dtype(device),
    )


def _rope_and_mask(cfg: ModelConfig, x: torch.Tensor | None, device):
    """cos, sin [1, s, d] in the forward's dtype; the boolean mask [1, 1, s, s], or None where SDPA's causal
    kernel does the masking (blocks.causal_kernel: CUDA, no sliding window inside the sequence)."""
    if x is None:
        return None, None, None
    seq = x.shape[1]
    rotary = Rotary(cfg).to(device)
    cos, sin = rotary(torch.arange(seq, device=device)[None], compute_dtype(device) or torch.float32)
    if causal_kernel(device, seq, cfg.sliding_window):
        return cos, sin, None
    return cos, sin, causal_mask(seq, 0, device, cfg.sliding_window)


def _chunk(cfg: ModelConfig, x: torch.Tensor | None, device, width: int | None = None) -> int:
    """Samples per forward so that the widest intermediate stays near 512 MiB (2 GiB on CUDA)."""
    if x is None:
        return 1
    seq = x.shape[1]
    scores = 0 if causal_kernel(device, seq, cfg.sliding_window) else cfg.num_heads * seq  # [h, s, s] or none
    width = width or max(cfg.intermediate_size, scores, 3 * cfg.hidden_size)
    budget = 1 << 29 if torch.device(device).type == "cuda" else 1 << 27  # floats
    return max(1, budget // (seq * width))


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("quant.device=cuda, but no CUDA device is visible here; use --device cpu or auto.")
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def check_settings(cfg: ModelConfig, qc: QuantConfig) -> None:
    """Everything about (model, settings) that would fail mid-walk, reported at once before any work."""
    problems = []
    if qc.quantize_lm_head and cfg.tie_word_embeddings:
        problems.append(
            "quant.quantize_lm_head: this model ties lm_head to the input embeddings; quantizing lm_head "
            "would untie them (a second vocab x hidden matrix). Leave lm_head unquantized (the default)."
        )
    if problems:
        raise InputError("cannot quantize this model with these settings:\n  - " + "\n  - ".join(problems))


def _check_ids(ids: torch.Tensor, cfg: ModelConfig) -> None:
    if ids.dim() != 2 or ids.dtype not in (torch.int32, torch.int64) or ids.numel() == 0:
        raise InputError(
            f"calibration ids must be a non-empty int tensor [samples, seq_len], got "
            f"{ids.dtype} {tuple(ids.shape)}."
        )
    if int(ids.min()) < 0 or int(ids.max()) >= cfg.vocab_size:
        raise InputError(
            f"calibration ids must lie in [0, vocab_size={cfg.vocab_size}); got "
            f"[{int(ids.min())}, {int(ids.max())}]. Is the tokenizer the model's own?"
        )
