"""Assemble a ready runtime (weights, paged cache, model, engine) from an artifact or from tensors in memory."""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from lorafast_export.errors import InputError
from lorafast_export.model.spec import ModelConfig
from lorafast_export.runtime import int4_table
from lorafast_export.runtime.artifact import DTYPES, read_meta, read_weights
from lorafast_export.runtime.engine import Engine
from lorafast_export.runtime.graphs import device_guard, on_device
from lorafast_export.runtime.kv_cache import CacheConfig, PagedKVCache
from lorafast_export.runtime.options import RuntimeOptions
from lorafast_export.runtime.paged import (
    FUSED_MAX_ROWS,
    PagedModel,
    RopeTable,
    build_model,
    triton_attention_fits,
    use_attn_last_merges,
    use_device_sms,
    use_fused_decode,
    use_kernel_pdl,
)

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    config: ModelConfig
    options: RuntimeOptions
    device: torch.device
    dtype: torch.dtype
    cache: PagedKVCache
    model: object  # PagedModel, or aot.AOTModel
    engine: Engine
    kernels: dict[str, str]  # quantized module path → kernel
    attention: str
    compiled: bool
    aot: bool
    dense_gemv: bool = False  # the dense linears' small products run runtime/triton_gemv.py

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[b, s] → [b, s, V] fp32 on cpu: prefill only, the cache is not touched."""
        return self.device_logits(input_ids).cpu()

    @torch.no_grad()
    @on_device
    def device_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """`logits` left on the runtime's device."""
        return torch.cat(
            [self.model.prefill(r[None].to(self.device), None, last_only=False) for r in input_ids]
        )

    def generate_batch(
        self, prompts: list[list[int]], max_new_tokens: int | list[int], **sampling
    ) -> list[list[int]]:
        return self.engine.generate_batch(prompts, max_new_tokens, **sampling)


def runtime_device(device: str | torch.device) -> torch.device:
    """The device a runtime is asked for, checked: a name torch knows, and a CUDA device that exists here."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise InputError(f"device {device!r}: not a device name ({e}); use cpu, cuda or cuda:N.") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(
            f"device {str(dev)!r} asked for, but torch sees no CUDA device here; use device='cpu'."
        )
    if dev.type == "cuda" and dev.index is not None and dev.index >= (n := torch.cuda.device_count()):
        raise InputError(
            f"device {str(dev)!r} asked for, but torch sees {n} CUDA device(s) here: use cuda:0 to cuda:{n - 1}."
        )
    if dev.type not in ("cpu", "cuda"):
        raise InputError(f"device {str(dev)!r}: the runtime runs on cpu or cuda (cuda:N).")
    return dev


def _triton_on(device: torch.device) -> bool:
    return device.type == "cuda" and importlib.util.find_spec("triton") is not None


def check_kernel(opts: RuntimeOptions, device: torch.device) -> None:
    """kernel='triton' (our int4 and int8 kernels wherever the scheme allows) runs on CUDA only; auto picks
    the int4 ones where measured (int8: no measured table yet)."""
    if opts.kernel == "triton" and not _triton_on(device):
        raise InputError("kernel='triton' needs a CUDA device and the triton package; use 'auto'.")


def _triton_runs(device: torch.device) -> bool:
    """Our dense Triton kernels run here: on CUDA, or through Triton's interpreter (the CPU tests)."""
    interpret = os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton") is not None
    return _triton_on(device) or interpret


def _use_gemv(dec, device: torch.device) -> None:
    """dense_gemv='on': the dense linears' products of <= 8 rows (decode at small batches, a verify)
    through runtime/triton_gemv.py: no split-K, and row i does not depend on the other rows."""
    if not _triton_runs(device):
        raise InputError("dense_gemv='on' needs a CUDA device and the triton package; use 'off'.")
    from lorafast_export.runtime.triton_gemv import use_gemv

    log.info("dense GEMV for %d linears", use_gemv(dec))


def fused_decode_on(opts: RuntimeOptions, device: torch.device, dtype: torch.dtype) -> bool:
    """fused_decode: on or mma (CUDA, or the Triton interpreter in tests), off, or auto = on CUDA in bf16/fp16."""
    if opts.fused_decode in ("on", "mma") and not _triton_runs(device):
        raise InputError(
            f"fused_decode={opts.fused_decode!r} needs a CUDA device and the triton package; use 'off'."
        )
    return opts.fused_decode in ("on", "mma") or (
        opts.fused_decode == "auto" and _triton_on(device) and dtype in (torch.bfloat16, torch.float16)
    )


# GPUs (int4_table.gpu_slug prefixes) where fused_decode=auto runs the dense fused ops on the tensor cores at every
# row count: where that was measured faster than cuBLAS's products with their own norm and add kernels at 2-8 rows
# (bench/TORCH.md, session 29: H100 80GB HBM3, +5.3-7.8% at batch 2-8), MMA_TABLE's configurations fit the shared
# memory, and a runtime with a draft verifies on them at 1.73x the fastest draft-less runtime (session 43). Not yet
# timed with a draft on an H200, whose bandwidth could favour cuBLAS and the CUDA-core kernels: it keeps those.
MMA_AUTO_GPUS = ("h100",)


def fused_mma_from(opts: RuntimeOptions, device: torch.device) -> bool:
    """Whether the dense fused ops run on the tensor cores (paged.use_fused_decode's `mma`), at every row count:
    for mma, and for auto on a GPU of MMA_AUTO_GPUS, with or without a draft, so that a runtime's
    greedy output does not depend on whether it was loaded with a draft: a verify row computes what the one-row
    step computes, bit for bit, and a verify costs about one step (flat from 1 to 8 rows) where the CUDA-core
    kernels pay each row's FMAs (a 5-token verify of the 8B shape ~12 ms against 5.5; speculation 1.21x against
    1.73x). The price: the CUDA-core kernels' one-row step is ~5% faster (188.9 against 179.0 tok/s at the 8B shape
    on an H100, bench/TORCH.md, session 43); fused_decode=on takes them, whose own speculation is 1.21x."""
    if opts.fused_decode == "mma":
        return True
    if opts.fused_decode != "auto" or device.type != "cuda":
        return False
    return int4_table.gpu_slug(torch.cuda.get_device_name(device)).startswith(MMA_AUTO_GPUS)


def dense_gemv_on(opts: RuntimeOptions, device: torch.device, speculative: bool) -> bool:
    """dense_gemv: on, off, or auto = on for a runtime that verifies a draft's tokens on CUDA, so that a
    verify row computes what the plain step computes (the speculative output is then its own greedy output
    token for token, as on the H200 in session 7: demo 512 of 512, 8B 128 of 128); off otherwise."""
    return opts.dense_gemv == "on" or (opts.dense_gemv == "auto" and speculative and _triton_on(device))


def resolve_attention(opts: RuntimeOptions, cfg: ModelConfig, device: torch.device) -> str:
    """auto = triton (runtime/triton_attention.py: reads the pool in place) on CUDA where its tiles fit,
    else gather. On an H200 it gave the eager model's tokens and removed the KV gather copy (bf16 batch 32:
    7.4 ms per step against 9.4 with gather; bench/TORCH.md). Compiled flex gave wrong outputs and no
    speed-up (runtime/attention.py)."""
    has_triton = _triton_on(device)
    if opts.attention == "triton" and not has_triton:
        raise InputError("attention='triton' needs a CUDA device and the triton package; use 'gather'.")
    if opts.attention == "auto":
        return "triton" if has_triton and triton_attention_fits(cfg.head_dim, opts.block_size) else "gather"
    return opts.attention


def cache_config(opts: RuntimeOptions, cfg: ModelConfig, dtype: torch.dtype, max_seq_len: int) -> CacheConfig:
    if opts.cache_tokens:
        return CacheConfig(opts.block_size, max_tokens=opts.cache_tokens)
    per_token = (
        2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * torch.empty((), dtype=dtype).element_size()
    )
    tokens = min(opts.max_batch * max_seq_len, int(opts.cache_gib * 2**30) // per_token)
    return CacheConfig(opts.block_size, max_tokens=max(tokens, max_seq_len))


def build_runtime(
    cfg: ModelConfig,
    fp: dict | None,
    q: dict | None,
    device: str | torch.device,
    dtype: torch.dtype,
    opts: RuntimeOptions,
    aot_dir: Path | None = None,
    aot_meta: dict | None = None,
    draft: Runtime | None = None,
) -> Runtime:
    """A runtime over these tensors. With aot_dir/aot_meta the AOTInductor packages replace the Python model.
    draft: a runtime of a smaller model with the same vocabulary (e.g. the int4 artifact of the same
    fine-tune) that proposes tokens for greedy speculative decoding (runtime/engine.py)."""
    device = torch.device(device)
    with device_guard(device):  # the kernels compiled and the graphs captured here are this device's
        return _build_runtime(cfg, fp, q, device, dtype, opts, aot_dir, aot_meta, draft)


def _build_runtime(cfg, fp, q, device, dtype, opts, aot_dir, aot_meta, draft) -> Runtime:
    max_seq_len = opts.max_seq_len or min(cfg.max_position_embeddings, 4096)
    attention = resolve_attention(opts, cfg, device)
    check_kernel(opts, device)
    compiled = opts.compile == "on" or (opts.compile == "auto" and device.type == "cuda")
    ccfg = cache_config(opts, cfg, dtype, max_seq_len)
    if aot_meta is not None:  # the packages were compiled for one pool size and attention kind
        ccfg = CacheConfig(opts.block_size, num_blocks=aot_meta["pool_slots"] // opts.block_size - 1)
        attention, compiled = aot_meta["attention"], False
    cache = PagedKVCache(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, ccfg, dtype, device)
    gemv = False
    if aot_meta is not None:
        from lorafast_export.runtime.aot import AOTModel

        model, kernels = AOTModel(aot_dir, aot_meta, cache), dict(aot_meta["kernels"])
    else:
        dec, kernels = build_model(cfg, fp, q, device, dtype, opts.kernel)
        dec.rotary = RopeTable(dec.rotary, max_seq_len, dtype)
        if gemv := dense_gemv_on(opts, device, draft is not None):
            _use_gemv(dec, device)
        if fused_decode_on(opts, device, dtype):  # a verify's rows must compute what a decode step computes
            rows = FUSED_MAX_ROWS if draft is not None else 1  # mma: the dense ops at up to 8 rows anyway
            mma = fused_mma_from(opts, device)
            n = use_fused_decode(dec, rows, mma)
            log.info("fused decode kernels for %d layers (tensor cores: %s)", n, "every row" if mma else "no")
        if attention == "triton":
            use_device_sms(dec, device)
        if opts.kernel_pdl and (n := use_kernel_pdl(dec, device, opts.fused_pdl)) is not None:
            log.info("programmatic dependent launch: attention and %d int4 MMA linears", n)
        if opts.attn_last_merges and attention == "triton":  # a verify's tokens are rows of the kernel too
            use_attn_last_merges(dec, device, opts.max_batch * (opts.spec_k + 1 if draft is not None else 1))
        model = PagedModel(dec, cache, attention)
        model.pdl = opts.inductor_pdl
        if compiled and (
            opts.prefill_compile == "on" or (opts.prefill_compile == "auto" and device.type == "cuda")
        ):
            model.compile_prefill()
    engine = Engine(
        model,
        cache,
        max_batch=opts.max_batch,
        max_seq_len=max_seq_len,
        batch_buckets=opts.batch_buckets,
        compile=compiled,
        fixed_width=attention == "flex",
        device=device,
        prefill_budget=1 if aot_meta is not None else opts.prefill_tokens,  # the AOT prefill takes one row
        prefill_chunk=0
        if aot_meta is not None
        else opts.prefill_chunk,  # the AOT packages have no chunk forward
        decode_steps=opts.decode_steps,
        admit_order=opts.admit_order,
        max_wait_ms=opts.max_wait_ms,
        prefill_first=opts.prefill_first,
        overlap_bursts=opts.overlap_bursts,
        overlap_rounds=opts.overlap_rounds,
        argmax=_argmax(opts, device),
        **_draft_args(draft, cfg, opts, aot_meta is not None),
    )
    if opts.warm_up == "on" or (opts.warm_up == "auto" and engine.cuda_graphs):
        calls = engine.warm_up()
        log.info("warm-up: %d step shapes compiled and captured in %.1f s", calls, engine.warm_up_s)
    log.info(
        "runtime: %s %s, attention=%s, compiled=%s, aot=%s, cache %.1f MiB",
        device,
        dtype,
        attention,
        compiled,
        aot_meta is not None,
        cache.nbytes / 2**20,
    )
    return Runtime(
        cfg,
        opts,
        device,
        dtype,
        cache,
        model,
        engine,
        kernels,
        attention,
        compiled,
        aot_meta is not None,
        gemv,
    )


def _argmax(opts: RuntimeOptions, device: torch.device):
    """The engine's greedy argmax: option triton_argmax's kernels (runtime/triton_argmax.py) on CUDA (auto), or
    wherever Triton runs, its interpreter included (on), else None (torch's argmax). The tokens are the same
    either way."""
    runs = (
        _triton_on(device)
        if opts.triton_argmax == "auto"
        else opts.triton_argmax == "on" and _triton_runs(device)
    )
    if not runs:
        return None
    from lorafast_export.runtime.triton_argmax import argmax_last

    return argmax_last


def _draft_args(draft: Runtime | None, cfg: ModelConfig, opts: RuntimeOptions, aot: bool) -> dict:
    if draft is None:
        return {}
    if draft.config.vocab_size != cfg.vocab_size:
        raise InputError(
            f"draft model: vocabulary {draft.config.vocab_size} differs from the model's {cfg.vocab_size}; "
            "a draft must share the tokenizer (use the int4 artifact of the same fine-tune)."
        )
    if aot or draft.aot:
        raise InputError("speculative decoding runs the Python model: load without the AOT packages.")
    return {
        "draft": draft.model,
        "draft_cache": draft.cache,
        "spec_k": opts.spec_k,
        "speculation": opts.speculation,
    }


# a weight quantized at load (_int4_head, _int4_linears): the largest of these that divides its input width
HEAD_GROUPS = (128, 64, 32)


def _int4_at_load(fp: dict, q, names: list[str]):
    """fp's weights `names` as int4 QTensors (RTN, asymmetric, the largest of HEAD_GROUPS that divides the input
    width, float16 scales: the scheme of the measured int4 tables), beside q's: (fp without them, q with them, how
    many). A weight no group divides stays in fp. For a draft: it only proposes tokens and the model verifies each,
    so this moves acceptance, never the output."""
    from collections import ChainMap

    from lorafast_export.quant.rtn import quantize_rtn

    fp, made = dict(fp), {}
    for name in names:
        group = next((g for g in HEAD_GROUPS if fp[name].shape[1] % g == 0), None)
        if group is not None:
            made[name.removesuffix(".weight")] = quantize_rtn(
                fp.pop(name), 4, group, False, scale_dtype=torch.float16
            )
    return fp, ChainMap(made, q if q is not None else {}), len(made)


def _int4_head(cfg: ModelConfig, fp: dict, q, model_dir: Path):
    """The lm_head int4 at load, for a draft (option draft_int4_head): the draft's step reads a quarter of the
    head's bytes. Left as it is, with one log line, where the head is tied to the embeddings or already quantized."""
    from lorafast_export.model.spec import LM_HEAD

    if cfg.tie_word_embeddings or LM_HEAD not in fp or (q is not None and "lm_head" in q):
        log.info("%s: lm_head kept as stored (tied or already quantized)", model_dir)
        return fp, q
    fp, q, n = _int4_at_load(fp, q, [LM_HEAD])
    log.info(
        "%s: lm_head %s at load for drafting",
        model_dir,
        "quantized (int4 RTN)" if n else "kept (no group fits)",
    )
    return fp, q


def _int8_head(cfg: ModelConfig, fp: dict, q, model_dir: Path):
    """The lm_head int8 at load (per output channel, symmetric: the head a build's option lm_head gives a quantized
    torch-compile artifact, runtime/artifact.int8_head), for the artifact as its own int4 draft (`--speculative
    int4`): the draft is then the int4 artifact a build would make of it, head included. Left as it is, with one log
    line, where the head is tied to the embeddings, absent or already quantized."""
    from collections import ChainMap

    from lorafast_export.runtime.artifact import int8_head

    base = q if q is not None else {}
    fp, made, how = int8_head(cfg, fp, base)
    log.info("%s: lm_head %s for drafting", model_dir, "int8 at load" if made else f"kept as stored ({how})")
    return fp, ChainMap(made, base) if made else q


def _int4_linears(fp: dict, q, model_dir: Path):
    """Every decoder linear that fp holds, int4 at load: the model as its own int4 draft (`--speculative int4`)."""
    fp, q, n = _int4_at_load(fp, q, [k for k in fp if ".layers." in k and k.endswith("_proj.weight")])
    log.info("%s: %d linears quantized at load (int4 RTN) for drafting", model_dir, n)
    return fp, q


def open_runtime(
    model_dir: str | Path,
    device: str = "cpu",
    use_aot: bool | None = None,
    draft_dir: str | Path | None = None,
    *,
    int4_head: bool = False,
    int4_linears: bool = False,
    int8_head: bool = False,
    draft_int4: bool = False,
    **overrides,
) -> Runtime:
    """Load an artifact's model/ directory. overrides: RuntimeOptions fields (e.g. compile="off").
    use_aot: None = use the AOTInductor packages when they were built for this device type.
    draft_dir: another artifact's model/ directory whose model drafts for speculative decoding (its lm_head
    quantized at load with option draft_int4_head). int4_head: this model's lm_head quantized at load
    (`_int4_head`; what the model that loads a draft asks of it). int4_linears: its decoder linears too
    (`_int4_linears`); int8_head: its lm_head int8 (`_int8_head`; int4_head takes precedence); draft_int4: the
    draft's linears int4 and its head int8 (`--speculative int4`: the artifact as its own int4 draft, as a build
    would quantize it)."""
    model_dir = Path(model_dir)
    meta = read_meta(model_dir)
    cfg = ModelConfig.from_file(model_dir / "config.json")
    opts = RuntimeOptions.from_dict(meta["options"]).replace(**overrides)
    aot = meta.get("aot")
    dev = runtime_device(device)
    if use_aot and (aot is None or aot["device"] != dev.type):
        raise InputError(
            f"{model_dir}: no AOTInductor package for {dev.type} (built: "
            f"{aot and aot['device']}); rebuild with the aot option on a {dev.type} machine."
        )
    use = bool(aot) and aot["device"] == dev.type and use_aot is not False and draft_dir is None
    draft = None
    if draft_dir is not None:
        keep = {
            k: v for k, v in overrides.items() if k in ("compile", "max_batch", "max_seq_len", "block_size")
        }  # the draft's own engine never runs: the model's engine warms the draft's shapes
        draft = open_runtime(
            draft_dir,
            device,
            use_aot=False,
            warm_up="off",
            int4_head=opts.draft_int4_head,
            int4_linears=draft_int4,
            int8_head=draft_int4,
            **keep,
        )
    fp, q = (None, None) if use else read_weights(model_dir, meta, dev)  # a package holds its own weights
    if int4_linears and fp is not None:
        fp, q = _int4_linears(fp, q, model_dir)
    if int4_head and fp is not None:
        fp, q = _int4_head(cfg, fp, q, model_dir)
    elif int8_head and fp is not None:
        fp, q = _int8_head(cfg, fp, q, model_dir)
    return build_runtime(
        cfg,
        fp,
        q,
        dev,
        DTYPES[meta["dtype"]],
        opts,
        aot_dir=model_dir if use else None,
        aot_meta=aot if use else None,
        draft=draft,
    )
