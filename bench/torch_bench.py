"""Benchmark the torch-compile runtime against transformers' generate on the same random model, same run.

    PYTHONPATH=. python bench/torch_bench.py --device cuda --shape llama3-8b --out bench.json
    PYTHONPATH=. python bench/torch_bench.py --device cpu --shape small --sections cpu --out cpu.json

Sections (--sections, comma separated; each one's result is written to --out as soon as it ends):
  copy     device-to-device copy bandwidth (bytes read + written), the ceiling for decode
  check    correctness on the device: int4/int8 linears vs fake-quant, compiled gather/flex decode vs eager
  enginecheck  only check's compiled-engine part (fp32 tokens vs eager: packed and lone-prompt prefill)
  kernels  linear layers of the model's shapes: bf16 vs int4 tinygemm vs int8 weight-only, per batch rows
  attn     paged decode attention: gather vs flex (compiled), per batch and context length
  attnplan the Triton paged decode attention per (splits, blocks an iteration) vs attention.decode_plan's choice
  bf16     our runtime, bf16 weights: batch sizes x (prompt, new tokens); eager vs compiled at batch 1
  bf16g    bf16 with dense_gemv on (runtime/triton_gemv.py for <= 8 rows): the same runtime otherwise
  int4     our runtime, int4 g128 (RTN codes from the quantized form)
  hf       transformers generate (eager, dynamic cache) at the same batch sizes
  mixed    32 requests of mixed prompt/output lengths: our continuous batching vs transformers batched generate
  hfstatic transformers generate with the static cache + torch.compile, batch 1
  e2e      end to end at batch 1, ours (bf16) vs hfstatic's peer, each timed --e2e-repeats times, interleaved
  cpu      (CPU) compiled vs eager decode of our runtime
  profile  torch.profiler per-kernel breakdown of decode steps at batch 1 and 32 (bf16 and int4)
  spec     speculative decoding, batch 1: bf16 model + int4 draft (k = 2, 4) vs bf16 alone, same prompts
  specdemo the same on the trained demo (LoRA merged by PEFT), code prompts: acceptance that means something
  specwide the same on the demo widened to --shape (scripts/make_model.py widen): a trained function at 8B cost
  specmixed the mixed section's queue on a runtime loaded with the int4 draft, speculation auto (after mixed)
  gcwatch  Python's collections during passes of the mixed queue, then the same after gc.freeze() (after mixed)
  overlap  bf16 decode with the engine's overlap_bursts off and on (same runtime), batch sizes, 3 runs each
  pdl      bf16 batch 1 with inductor_pdl on (a second runtime) vs off, 3 runs each interleaved; its profile
  blas     the dense linears under cuBLAS vs cuBLASLt, weight as stored vs pre-transposed, 1 and 32 rows
  gemv     our Triton dense GEMV vs cuBLAS per linear shape at 1 and 5 rows (tiles swept, rows bitwise checked)
  fused    runtime/triton_fused.py: each fused op vs cuBLAS's product (tiles swept), decode fused_decode off/on
  int8k    our Triton int8 weight-only GEMV/GEMM (and DEQUANT + cuBLAS) vs bf16 per linear shape at 1, 32, 128 and
           1,024 rows (CUDA-graph timed; --int8-shapes head: the lm_head's shape, as tune-kernels measures it)
  int8cpu  CPU: an int8 weight-only layer per linear shape and row count, float32 and bf16: dense vs aten's pack
           product vs what auto lowers (session 35)
  int8     our runtime on an int8 weight-only model (per channel, symmetric: `--quant int8`), auto's kernels
  w8a8     our runtime on a SmoothQuant model (int8 weights per channel, int8 activations per token)
  int4h8, int8h8, w8a8h8   int4 / int8 / w8a8 with the lm_head int8 per channel (torch-compile's lm_head: auto)
  w8a8check  a SmoothQuant model of the check shape, compiled runtime vs the eager fake-quant one (float32)
  w8a8k    a SmoothQuant layer per linear shape and row count: bf16 vs what it ran before session 34
           (fake-quant activations, then dequant or our int8 kernel) vs W8A8Linear (the int8 GEMM), compiled
Random weights: speed does not depend on values. Not part of the test run.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import json
import os
import platform
import pstats
import random
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lorafast_export.model.spec import ModelConfig  # noqa: E402
from lorafast_export.qform import ACT_QUANT_INT8_PER_TOKEN, QLinear, with_fields  # noqa: E402
from lorafast_export.quant.rtn import quantize_rtn  # noqa: E402
from lorafast_export.runtime.bench import bench_runtime, random_prompts, run_requests  # noqa: E402
from lorafast_export.runtime.engine import MAX_WAIT_MS  # noqa: E402
from lorafast_export.runtime.int4_table import layer_shapes  # noqa: E402
from lorafast_export.runtime.linear import lower_qtensor  # noqa: E402
from lorafast_export.runtime.loader import build_runtime  # noqa: E402
from lorafast_export.runtime.options import RuntimeOptions  # noqa: E402
from lorafast_export.runtime.paged import pack_segments, prefill_layer  # noqa: E402
from lorafast_export.runtime.speculation import SpecGovernor  # noqa: E402
from scripts.make_model import PRESETS, llama_kwargs  # noqa: E402

SHAPES = {
    "llama3-8b": llama_kwargs(PRESETS["llama3-8b"]),
    "small": dict(
        vocab_size=32000,
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=4096,
    ),
    # no width of it in the kernel tables (but o_proj's 4096 x 4096): what every model but Llama-3-8B runs on
    "llama2-7b": dict(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=4096,
    ),
    "check": dict(
        vocab_size=1000,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=1024,
    ),
}
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def timeit(fn, dev, iters=50, warmup=5) -> float:
    """Median seconds of fn()."""
    for _ in range(warmup):
        fn()
    sync(dev)
    times = []
    for _ in range(iters):
        if dev.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def hf_model(shape: str, dev, dtype, layers: int = 0):
    import transformers

    c = dict(SHAPES[shape], **({"num_hidden_layers": layers} if layers else {}))
    cfg = transformers.LlamaConfig(**c, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(dev):
        model = transformers.LlamaForCausalLM._from_config(cfg, dtype=dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02) if p.dim() == 2 else p.fill_(1.0)
    return model.eval()


def config_of(model) -> tuple[ModelConfig, dict]:
    state = {k: v for k, v in model.state_dict().items() if "rotary_emb" not in k}
    return ModelConfig.from_dict(model.config.to_dict()), state


def quantize_linears(state: dict, bits=4, group=128, symmetric=False, head=False) -> tuple[dict, dict]:
    """RTN of every decoder linear; head: the lm_head too (a build's quant.quantize_lm_head, --quant-lm-head)."""
    fp, q = dict(state), {}
    names = [k for k in state if ".layers." in k and k.rsplit(".", 2)[-2] in LINEARS]
    if head and "lm_head.weight" in state:
        names.append("lm_head.weight")
    for name in names:
        path = name.removesuffix(".weight")
        q[path] = quantize_rtn(fp.pop(name), bits, group, symmetric, scale_dtype=torch.float16)
    return fp, q


def w8a8_linears(state: dict) -> tuple[dict, dict]:
    """A SmoothQuant model's layers for speed (no smoothing; speed does not depend on values): every decoder
    linear int8 per channel, symmetric, with int8 per-token activations (quant/smoothquant.quantize_w8a8)."""
    fp, q = quantize_linears(state, bits=8, group=-1, symmetric=True)
    return fp, {p: with_fields(qt, act_quant=ACT_QUANT_INT8_PER_TOKEN) for p, qt in q.items()}


def _int8_head(cfg: ModelConfig, fp: dict, q: dict | None) -> tuple[dict, dict, str]:
    """fp without its lm_head and q with it int8 per channel, as the torch-compile target's option lm_head (auto)
    stores a quantized artifact's head and `--speculative int4` its draft's (runtime/artifact.int8_head); and how."""
    from lorafast_export.runtime.artifact import int8_head

    fp, extra, how = int8_head(cfg, fp, q or {})
    return fp, {**(q or {}), **extra}, how


def bytes_per_step(rt) -> int:
    """Bytes of weights one decode step reads (everything but the embedding table)."""
    total = 0
    for name, mod in rt.model.dec.named_modules():
        if name.endswith("embed_tokens"):
            continue
        for t in list(mod.parameters(recurse=False)) + list(mod.buffers(recurse=False)):
            if name == "" or "rotary" in name:
                continue
            total += t.numel() * t.element_size()
    return total


def kv_bytes_per_token(cfg: ModelConfig, dtype) -> int:
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * torch.empty((), dtype=dtype).element_size()


# ------------------------------------------------------------------------------------------------ sections


def sec_copy(a, dev, R):
    n = (2 << 30) // 2
    src = torch.randn(n, device=dev, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    t = timeit(lambda: dst.copy_(src), dev, iters=20)
    return {"bytes": 2 * src.nbytes, "seconds": t, "TBps": 2 * src.nbytes / t / 1e12}


def sec_check(a, dev, R):
    out = {}
    torch.manual_seed(0)
    x = torch.randn(4, 4096, device=dev)
    for bits, group, sym in ((4, 128, False), (4, 128, True), (8, -1, True), (8, -1, False)):
        w = torch.randn(4096, 4096, device=dev) * 0.02
        qt = quantize_rtn(w, bits, group, sym)
        ref = QLinear(qt)(x)
        for prefer in ("auto", "dequant"):
            m = lower_qtensor(qt, dev, torch.bfloat16, prefer)
            y = m(x.bfloat16()).float()
            out[f"linear_int{bits}_g{group}_{'sym' if sym else 'asym'}_{m.kernel}"] = (
                (y - ref).norm() / ref.norm()
            ).item()
    cfg, state, prompts, base = _engine_check(dev, out)
    fp, q = quantize_linears(state, 4, 128, False)
    rt = build_runtime(cfg, fp, q, dev, torch.bfloat16, RuntimeOptions(compile="on", **base))
    ref = build_runtime(
        cfg, fp, q, dev, torch.bfloat16, RuntimeOptions(compile="off", kernel="dequant", **base)
    )
    ids = torch.tensor(prompts[:2])
    lr, ld = rt.logits(ids), ref.logits(ids)
    out["int4_model_logits_rel_err_vs_dequant_bf16"] = ((lr - ld).norm() / ld.norm()).item()
    out["int4_kernels"] = sorted(set(rt.kernels.values()))
    out.update(_check_triton_int4(cfg, fp, q, dev, prompts, ids, ld, base))
    return out


def sec_w8a8check(a, dev, R):
    """A SmoothQuant model of the check shape (w8a8_linears), float32: the compiled runtime (W8A8Linear, the
    int8 GEMM, CUDA graphs on CUDA) against the eager fake-quant runtime (kernel dequant: activations
    quantize-dequantized, the dequantized weights): logits and greedy tokens."""
    model = hf_model("check", dev, torch.float32)
    cfg, state = config_of(model)
    fp, q = w8a8_linears(state)
    prompts = random_prompts(5, 40, cfg.vocab_size, 1)
    base = dict(max_seq_len=256, max_batch=8, batch_buckets=[1, 8])
    rt = build_runtime(cfg, fp, q, dev, torch.float32, RuntimeOptions(compile="on", **base))

    def fake_quant(dtype):  # eager, activations quantize-dequantized, the dequantized weights
        opts = RuntimeOptions(compile="off", kernel="dequant", decode_steps=1, **base)
        return build_runtime(cfg, fp, q, dev, dtype, opts)

    ref = fake_quant(torch.float32)
    ids = torch.tensor(prompts[:2])
    lr, ld = rt.logits(ids), ref.logits(ids)
    got, want = rt.generate_batch(prompts, 24), ref.generate_batch(prompts, 24)
    del ref
    # activation codes flip at rounding ties between any two float32 orders of the same sums, so both are
    # also measured from the fake-quant runtime in float64
    f64 = fake_quant(torch.float64)
    l64 = f64.logits(ids).float()

    def rel(x, y):
        return ((x - y).norm() / y.norm()).item()

    return {
        "kernels": sorted(set(rt.kernels.values())),
        "reference_kernels": sorted(set(f64.kernels.values())),
        "logits_rel_err_vs_fake_quant": rel(lr, ld),
        "logits_rel_err_vs_fake_quant_float64": rel(lr, l64),
        "fake_quant_float32_rel_err_vs_float64": rel(ld, l64),
        "tokens_equal_fake_quant": got == want,
        "positions_equal": sum(
            x == y for g, w in zip(got, want, strict=True) for x, y in zip(g, w, strict=True)
        ),
        "positions": sum(map(len, want)),
    }


def _engine_check(dev, out: dict):
    """The compiled engine (CUDA graphs, packed and single-prompt prefill) against the eager one, fp32."""
    model = hf_model("check", dev, torch.float32)
    cfg, state = config_of(model)
    prompts = random_prompts(5, 40, cfg.vocab_size, 1)
    base = dict(max_seq_len=256, max_batch=8, batch_buckets=[1, 8])
    single = RuntimeOptions(compile="off", decode_steps=1, **base)  # compiled runs chain 8 steps per burst
    eager = build_runtime(cfg, state, None, dev, torch.float32, single)
    want = eager.generate_batch(prompts, 24)
    for attn in ("triton", "gather") if dev.type == "cuda" else ("gather",):
        rt = build_runtime(
            cfg, state, None, dev, torch.float32, RuntimeOptions(compile="on", attention=attn, **base)
        )
        t = time.perf_counter()
        try:
            got = rt.generate_batch(prompts, 24)
            alone = [rt.generate_batch([p], 24)[0] for p in prompts[:2]]  # a lone prompt's prefill graph
        except Exception as e:  # noqa: BLE001 - a failing kernel is a result; the other sections go on
            got = alone = f"{type(e).__name__}: {str(e)[:300]}"
        out[f"engine_compiled_{attn}_attention"] = rt.attention
        out[f"engine_compiled_{attn}_tokens_equal_eager"] = got == want
        out[f"engine_compiled_{attn}_single_prompt_tokens_equal_eager"] = alone == want[:2]
        out[f"engine_compiled_{attn}_first_run_s"] = time.perf_counter() - t
    return cfg, state, prompts, base


def sec_enginecheck(a, dev, R):
    out = {}
    _engine_check(dev, out)
    return out


def _check_triton_int4(cfg, fp, q, dev, prompts, ids, ld, base) -> dict:
    """Our Triton int4 kernels in the whole runtime: bf16 logits vs the dequant model; fp32 greedy tokens
    of the compiled step (CUDA graph) vs eager, both through the Triton kernels."""
    out = {}
    rt = build_runtime(cfg, fp, q, dev, torch.bfloat16, RuntimeOptions(compile="on", kernel="triton", **base))
    lt = rt.logits(ids)
    out["int4_triton_model_logits_rel_err_vs_dequant_bf16"] = ((lt - ld).norm() / ld.norm()).item()
    out["int4_triton_kernels"] = sorted(set(rt.kernels.values()))
    runs = {}
    for mode in ("off", "on"):
        o = RuntimeOptions(compile=mode, kernel="triton", **base)
        runs[mode] = build_runtime(cfg, fp, q, dev, torch.float32, o).generate_batch(prompts, 24)
    out["int4_triton_fp32_compiled_tokens_equal_eager"] = runs["on"] == runs["off"]
    return out


def sec_kernels(a, dev, R):
    c = SHAPES[a.shape]
    h, i, kv = (
        c["hidden_size"],
        c["intermediate_size"],
        c["num_key_value_heads"] * (c["hidden_size"] // c["num_attention_heads"]),
    )
    rows = []
    for n, k in ((h, h), (kv, h), (i, h), (h, i)):
        w = torch.randn(n, k, device=dev) * 0.02
        mods = {"bf16": None}
        for bits, group in ((4, 128), (8, -1)):
            mods[f"int{bits}"] = lower_qtensor(quantize_rtn(w, bits, group, False), dev, torch.bfloat16)
        wb = w.bfloat16()
        for m in (1, 8, 32):
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            row = {"n": n, "k": k, "m": m}
            for name, mod in mods.items():
                fn = (lambda x=x, wb=wb: F.linear(x, wb)) if mod is None else (lambda x=x, mod=mod: mod(x))
                row[f"{name}_us"] = 1e6 * timeit(fn, dev, iters=100)
            rows.append(row)
    return rows


def sec_attn(a, dev, R):
    from lorafast_export.runtime.attention import decode_flex, decode_gather

    c = SHAPES[a.shape]
    hq, hkv = c["num_attention_heads"], c["num_key_value_heads"]
    d, bs = c["hidden_size"] // hq, a.block_size
    rows = []
    for ctx in (384, 2048):
        for b in (1, 8, 32):
            nb = b * (ctx // bs) + 1
            k_pool = torch.randn(hkv, nb * bs, d, device=dev, dtype=torch.bfloat16)
            v_pool = torch.randn_like(k_pool)
            perm = torch.randperm(nb - 1, device=dev) + 1
            tables = perm.view(b, ctx // bs).int()
            width = (
                4096 // bs
            )  # a max_seq_len of 4096: flex keeps this fixed width, gather pads to 2^k >= used
            full = torch.zeros(b, width, dtype=torch.int32, device=dev)
            full[:, : ctx // bs] = tables
            lens = torch.full((b,), ctx, device=dev)
            q = torch.randn(b, hq, 1, d, device=dev, dtype=torch.bfloat16)
            gat = torch.compile(decode_gather, dynamic=False)
            flx = torch.compile(decode_flex, dynamic=False)
            g_args, f_args = (q, k_pool, v_pool, tables, lens, bs), (q, k_pool, v_pool, full, lens, bs)
            diff = (gat(*g_args) - flx(*f_args)).abs().max().item()
            rows.append(
                {
                    "batch": b,
                    "ctx": ctx,
                    "max_abs_diff": diff,
                    "gather_us": 1e6 * timeit(lambda f=gat, x=g_args: f(*x), dev),
                    "flex_us": 1e6 * timeit(lambda f=flx, x=f_args: f(*x), dev),
                    "kv_bytes": 2 * b * ctx * hkv * d * 2,
                }
            )
    return rows


def sec_attnplan(a, dev, R):
    """The Triton paged decode attention per (context splits, cache blocks an iteration), against the plan the
    runtime takes (attention.decode_plan) and the split-only plan of sessions 9-38 (num_splits, one block): 32 calls
    (one a layer, each its own pools, so the KV is not in L2), each waiting for the one before as the runtime's
    PDL launches do, captured in one CUDA graph; us a call. The outputs of every plan are compared with the
    split-only plan's (max abs diff)."""
    from lorafast_export.runtime.attention import decode_plan, num_splits
    from lorafast_export.runtime.triton_attention import paged_decode

    c = SHAPES[a.shape]
    hq, hkv = c["num_attention_heads"], c["num_key_value_heads"]
    d, bs, layers = c["hidden_size"] // hq, a.block_size, 32
    pdl = torch.cuda.get_device_capability(dev) >= (9, 0)
    rows = []
    for ctx in (128, 384, 1024, 4096):
        for b in (1, 8, 32):
            used = -(-ctx // bs)
            width = max(2, 1 << (used - 1).bit_length())
            pools = []
            for _ in range(layers):
                k_pool = torch.randn(hkv, (b * used + 1) * bs, d, device=dev, dtype=torch.bfloat16)
                pools.append((k_pool, torch.randn_like(k_pool)))
            tables = torch.zeros(b, width, dtype=torch.int32, device=dev)
            tables[:, :used] = (torch.randperm(b * used, device=dev) + 1).view(b, used).int()
            lens = torch.full((b,), ctx, device=dev)
            q = torch.randn(b, hq, d, device=dev, dtype=torch.bfloat16)
            old = (num_splits(b, hkv, width), 1)
            plan = decode_plan(b, hkv, width)
            cands = {old, plan}
            for sp in (1, 2, 4, 8, 16, 32):
                for nb in (1, 2, 4, 8):
                    if sp <= width and nb * sp <= 2 * width:
                        cands.add((sp, nb))
            want = paged_decode(q, *pools[0], tables, lens, bs, 0, old[0], pdl, False, None, old[1])

            def chain(sp, nb, pools=pools, q=q, tables=tables, lens=lens):
                for kp, vp in pools:
                    paged_decode(q, kp, vp, tables, lens, bs, 0, sp, pdl, False, None, nb)

            for sp, nb in sorted(cands):
                got = paged_decode(q, *pools[0], tables, lens, bs, 0, sp, pdl, False, None, nb)
                chain(sp, nb)
                torch.cuda.synchronize(dev)
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    chain(sp, nb)
                us = 1e6 * timeit(g.replay, dev, iters=20, warmup=3) / layers
                rows.append(
                    {"batch": b, "ctx": ctx, "width": width, "splits": sp, "blocks": nb, "us": round(us, 2),
                     "old": (sp, nb) == old, "plan": (sp, nb) == plan,
                     "max_abs_diff": (got.float() - want.float()).abs().max().item()}
                )  # fmt: skip
                del g
            best = min((r for r in rows if r["batch"] == b and r["ctx"] == ctx), key=lambda r: r["us"])
            mine = [r for r in rows if r["batch"] == b and r["ctx"] == ctx and (r["old"] or r["plan"])]
            print(f"  attnplan b{b} ctx{ctx}: best {best['splits']}x{best['blocks']} {best['us']} us; "
                  + ", ".join(f"{'old' if r['old'] else 'plan'} {r['splits']}x{r['blocks']} {r['us']}" for r in mine),
                  flush=True)  # fmt: skip
            del pools, chain
            torch.cuda.empty_cache()
    return rows


def run_ours(a, dev, R, fp, q, cfg, attention, batches, eager_too=False, gemv=None):
    opts = RuntimeOptions(
        dense_gemv=gemv or a.dense_gemv,
        compile="on",
        attention=attention,
        max_seq_len=a.max_seq_len,
        max_batch=max(batches),
        batch_buckets=tuple(sorted(set(batches))),
        cache_gib=a.cache_gib,
        block_size=a.block_size,
        decode_steps=a.decode_steps,
        prefill_compile=a.prefill_compile,
        fused_decode=a.fused_decode,  # before session 20 this was left at its default (auto) here
        kernel_pdl=a.kernel_pdl == "on",
        fused_pdl=a.fused_pdl == "on",
        triton_argmax=a.triton_argmax,
        attn_last_merges=a.attn_last_merges == "on",
    )
    rt = build_runtime(cfg, fp, q, dev, torch.bfloat16, opts)
    t = time.perf_counter()
    res = bench_runtime(rt, batches, a.prompt_len, a.new_tokens, warmup=True)
    res["total_s_including_warmup_and_compile"] = time.perf_counter() - t
    res["decode_steps"] = opts.decode_steps
    res["fused_decode"] = opts.fused_decode
    res["kernel_pdl"] = opts.kernel_pdl
    res["fused_pdl"] = opts.fused_pdl
    res["triton_argmax"] = opts.triton_argmax
    res["attn_last_merges"] = opts.attn_last_merges
    if opts.decode_steps > 1 and a.single_step_peer:
        res["single_step"] = single_step_peer(rt, a, batches)
    step_bytes = bytes_per_step(rt)
    ctx = a.prompt_len + a.new_tokens / 2
    copy = R.get("copy", {}).get("TBps")
    for r in res["results"]:
        read = step_bytes + r["batch"] * ctx * kv_bytes_per_token(cfg, torch.bfloat16)
        r["bytes_per_step"] = read
        r["achieved_TBps"] = read / (r["decode_step_ms"] / 1e3) / 1e12
        r["fraction_of_copy_bw"] = r["achieved_TBps"] / copy if copy else None
    res["weight_bytes_per_step"] = step_bytes
    if eager_too:
        rt_e = build_runtime(cfg, fp, q, dev, torch.bfloat16, opts.replace(compile="off"))
        p = random_prompts(1, a.prompt_len, cfg.vocab_size)
        run_requests(rt_e, p, [8])
        res["eager_batch1"] = run_requests(rt_e, p, [min(64, a.new_tokens)])
    return rt, res


def single_step_peer(rt, a, batches) -> dict:
    """The same runtime at decode_steps=1 (a host round trip per token): what multi-step decoding gains,
    and whether its greedy tokens are the single steps' tokens (same graphs, same kernels)."""
    eng, keep = rt.engine, rt.engine.decode_steps
    prompts = random_prompts(max(batches), a.prompt_len, rt.config.vocab_size, 7)
    multi = eng.generate_batch(prompts, 48)
    eng.decode_steps = a.peer_steps
    try:
        single = eng.generate_batch(prompts, 48)
        res = bench_runtime(rt, batches, a.prompt_len, a.new_tokens, warmup=True)
    finally:
        eng.decode_steps = keep
    return {
        "peer_decode_steps": a.peer_steps,
        "tokens_equal_multi_step": single == multi,
        "rows_equal": sum(x == y for x, y in zip(single, multi, strict=True)),
        "results": res["results"],
    }


def sec_model(a, dev, R, quant: bool | str, gemv: str | None = None, head8: bool = False):
    """Our runtime at a.batches; quant: True int4 g128, "w8a8" a SmoothQuant model (w8a8_linears), "int8"
    int8 weight-only per channel, symmetric (what `--quant int8` builds), False bf16; gemv='on' (section bf16g): dense_gemv on, and its greedy tokens for one prompt compared with the
    bf16 section's (cuBLAS) when that ran first in this call. head8 (sections int4h8, int8h8, w8a8h8): the lm_head
    int8 per channel, as the torch-compile target's option lm_head (auto) stores a quantized artifact's head."""
    model = R["_model"]
    cfg, state = config_of(model)
    if quant == "w8a8":
        fp, q = w8a8_linears(state)
    elif quant == "int8":
        fp, q = quantize_linears(state, bits=8, group=-1, symmetric=True)
    else:
        fp, q = quantize_linears(state, head=a.quant_lm_head) if quant else (state, None)
    attention = R.get("_attn_choice", a.attention)
    label = quant if quant in ("w8a8", "int8") else "int4" if quant else ("bf16g" if gemv == "on" else "bf16")
    if head8:
        fp, q, head = _int8_head(cfg, fp, q)
        label += "h8"
        print(f"  {label}: lm_head {head}", flush=True)
    eager = label == "bf16" and a.eager_peer
    rt, res = run_ours(a, dev, R, fp, q, cfg, attention, a.batches, eager_too=eager, gemv=gemv)
    res["dense_gemv"] = rt.options.dense_gemv
    res["kernels"] = sorted(set(rt.kernels.values()))
    if label in ("bf16", "bf16g", "int4", "int4h8"):  # reused by the profile section; the others free the GPU
        R[f"_rt_{label}"] = rt
    if not quant:
        toks = R[f"_tokens_{label}"] = rt.generate_batch(
            random_prompts(1, a.prompt_len, cfg.vocab_size, 99), 64
        )
        other = R.get("_tokens_bf16" if label == "bf16g" else "_tokens_bf16g")
        if other is not None:
            res["greedy_64_positions_equal_other_bf16_section"] = sum(
                x == y for x, y in zip(toks[0], other[0], strict=True)
            )
    if a.mixed_with == label:
        R["_mixed_rt"] = rt
    return res


@torch.no_grad()
def hf_generate(model, prompts: list[list[int]], new: int, dev, **kw) -> tuple[float, int]:
    """Left-padded batched greedy generate of exactly `new` tokens per prompt; (seconds, tokens made)."""
    longest = max(map(len, prompts))
    ids = torch.zeros(len(prompts), longest, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, longest - len(p) :] = torch.tensor(p)
        mask[i, longest - len(p) :] = 1
    sync(dev)
    t = time.perf_counter()
    out = model.generate(
        ids.to(dev),
        attention_mask=mask.to(dev),
        max_new_tokens=new,
        min_new_tokens=new,
        do_sample=False,
        pad_token_id=0,
        **kw,
    )
    sync(dev)
    return time.perf_counter() - t, (out.shape[1] - longest) * len(prompts)


def sec_hf(a, dev, R):
    model, rows = R["_model"], []
    for b in a.batches:
        prompts = random_prompts(b, a.prompt_len, model.config.vocab_size, b)
        hf_generate(model, prompts, 4, dev)
        torch.cuda.reset_peak_memory_stats() if dev.type == "cuda" else None
        s, n = hf_generate(model, prompts, a.new_tokens, dev)
        rows.append(
            {
                "batch": b,
                "seconds": s,
                "tokens": n,
                "tokens_per_s": n / s,
                "peak_memory_bytes": torch.cuda.max_memory_allocated() if dev.type == "cuda" else None,
            }
        )
    return rows


def mixed_workload(n=32, seed=0, vocab=128256, out_max=256):
    rnd = random.Random(seed)
    lens = [rnd.randint(32, 512) for _ in range(n)]
    outs = [min(out_max, rnd.randint(32, 256)) for _ in range(n)]
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (p,), generator=g).tolist() for p in lens], outs


# admission policies of the mixed section: label -> (admit_order, prefill budget in prompt tokens,
# prefill_first, compiled prefill, max_wait_ms); --mixed-policies picks some. The first one run is
# res["ours"]. "default" is RuntimeOptions' default; the other shortest-first ones have no aging (inf),
# as measured before aging existed.
NO_AGING = float("inf")
MIXED_POLICIES = {
    "default": ("shortest", 4096, True, True, MAX_WAIT_MS),
    "arrival_4096": ("arrival", 4096, False, False, 0.0),
    "shortest_4096_prefill_first": ("shortest", 4096, True, False, NO_AGING),
    "shortest_2048_prefill_first": ("shortest", 2048, True, False, NO_AGING),
    "shortest_4096_prefill_first_compiled": ("shortest", 4096, True, True, NO_AGING),
    "shortest_2048_prefill_first_compiled": ("shortest", 2048, True, True, NO_AGING),
    "shortest_1024_prefill_first_compiled": ("shortest", 1024, True, True, NO_AGING),
    "shortest_4096_aging100_compiled": ("shortest", 4096, True, True, 100.0),
    "arrival_4096_prefill_first_compiled": ("arrival", 4096, True, True, 0.0),
}


class FirstTimeWatch:
    """What a pass did for the first time, beside its wall time: Triton JIT cache misses (a kernel of ours met an
    argument specialization, e.g. an int divisible by 16 or equal to 1, that no earlier call had: a compile, or a
    load from Triton's disk cache), Triton kernel binaries loaded into the CUDA context, and the caching
    allocator's cudaMalloc calls. With `profile`, also torch.profiler's host-side ops (CPU and CUDA runtime API
    events such as cudaHostAlloc, cuModuleLoadData, cudaStreamSynchronize) and cProfile's Python functions (a
    first-time import or lazy set-up shows there, not among the ops), for `host_diff`."""

    def __init__(self, profile: bool = False, scope: tuple | None = None):
        self.profile, self.misses, self.loads, self._load_t0 = profile, [], [], {}
        self.ops: dict = {}  # name -> (calls, self ms): torch.profiler's host-side events
        self.py: dict = {}  # function -> (calls, own ms): cProfile's
        # scope = (object, method name): profile only that method's calls (each one on its own, summed), e.g. the
        # engine's _prefill: at the 8B shape the whole pass under both profilers took minutes (session 17)
        self.scope, self.calls_ms = scope, []  # calls_ms: (host ms, landed ms) of each scoped call

    def _miss(self, *, key, repr, fn, compile, is_manual_warmup, already_compiled):  # noqa: A002 - Triton's names
        self.misses.append(f"{fn.module}.{fn.name}: {repr[:300]}")
        return None  # compile as usual

    def _load_start(self, module, function, name, metadata_group, hash):  # noqa: A002
        self._load_t0[hash] = time.perf_counter()

    def _load_end(self, module, function, name, metadata_group, hash):  # noqa: A002
        self.loads.append(
            (name, round(1e3 * (time.perf_counter() - self._load_t0.pop(hash, time.perf_counter())), 3))
        )

    def __enter__(self):
        from triton import knobs

        self._knobs = knobs.runtime
        self._keep = self._knobs.jit_cache_hook
        self._knobs.jit_cache_hook = self._miss
        self._knobs.kernel_load_start_hook.add(self._load_start)
        self._knobs.kernel_load_end_hook.add(self._load_end)
        self._prof = None
        if self.profile and self.scope is not None:
            self._py = cProfile.Profile()
            obj, name = self.scope
            self._unscoped = getattr(obj, name)
            setattr(obj, name, self._scoped(self._unscoped))
        elif self.profile:
            from torch.profiler import ProfilerActivity, profile

            self._prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
            self._prof.__enter__()
            self._py = cProfile.Profile()
            self._py.enable()
        return self

    def _scoped(self, fn):
        from torch.profiler import ProfilerActivity, profile

        def call(*args, **kwargs):
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                t = time.perf_counter()
                self._py.enable()
                try:
                    out = fn(*args, **kwargs)
                finally:
                    self._py.disable()
                host = time.perf_counter() - t
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                landed = time.perf_counter() - t
            for e in prof.key_averages():
                c, ms = self.ops.get(e.key, (0, 0.0))
                self.ops[e.key] = (c + e.count, ms + e.self_cpu_time_total / 1e3)
            self.calls_ms.append((round(1e3 * host, 2), round(1e3 * landed, 2)))
            return out

        return call

    def __exit__(self, *exc):
        if self.profile and self.scope is not None:
            setattr(*self.scope, self._unscoped)
        elif self._prof is not None:
            self._py.disable()
            self._prof.__exit__(*exc)
            self.ops = {  # op name -> (calls, self CPU ms): host time, kernels excluded
                e.key: (e.count, e.self_cpu_time_total / 1e3) for e in self._prof.key_averages()
            }
        if self.profile:
            self.py = {
                f"{Path(f).name}:{line}({name})": (calls, 1e3 * own)
                for (f, line, name), (_, calls, own, _, _) in pstats.Stats(self._py).stats.items()
            }
        self._knobs.jit_cache_hook = self._keep
        self._knobs.kernel_load_start_hook.remove(self._load_start)
        self._knobs.kernel_load_end_hook.remove(self._load_end)
        return False

    def summary(self) -> dict:
        return {
            "triton_jit_misses": self.misses,
            "triton_kernel_loads": len(self.loads),
            "triton_kernel_load_ms": round(sum(ms for _, ms in self.loads), 3),
            "triton_kernels_loaded": [n for n, _ in self.loads][:50],
            **({"scoped_calls_host_landed_ms": self.calls_ms} if self.scope is not None else {}),
        }


def host_diff(first: dict, again: dict, top: int = 40) -> list[dict]:
    """Names (ops or functions: name -> (calls, own ms)) that cost more in the first pass than in a repeat of
    it, the largest excess first."""
    rows = []
    for name in set(first) | set(again):
        (c1, ms1), (c2, ms2) = first.get(name, (0, 0.0)), again.get(name, (0, 0.0))
        rows.append(
            {
                "op": name,
                "calls_first": c1,
                "calls_again": c2,
                "ms_first": round(ms1, 3),
                "ms_again": round(ms2, 3),
            }
        )
    rows.sort(key=lambda r: r["ms_again"] - r["ms_first"])
    return rows[:top]


def _scope(a, eng):
    """--first-pass-profile 2: profile only the engine's prefills (each packed prefill's host launch)."""
    return (eng, "_prefill") if a.first_pass_profile == 2 else None


def mixed_policies(a, rt, prompts, outs) -> dict:
    """The same queue under each admission policy: a warm-up pass (captures, compiles), then a timed one; before
    the first policy's, a timed first pass (the runtime as its load-time warm-up left it)."""
    eng, pm, res = rt.engine, rt.model, {}
    knobs = ("admit_order", "prefill_budget", "prefill_first", "max_wait_ms")
    keep = [getattr(eng, k) for k in knobs], pm.prefill_fn
    eager = prefill_layer
    compiled = None if pm.prefill_fn is eager else pm.prefill_fn  # the bf16 section's runtime may have one
    try:
        for label in a.mixed_policies.split(","):
            order, budget, first, comp, wait = MIXED_POLICIES[label]
            if time.perf_counter() - a.t0 > a.budget_s:
                res[label] = {"skipped": "time budget"}
                continue
            for k, v in zip(knobs, (order, budget, first, wait), strict=True):
                setattr(eng, k, v)
            if comp and compiled is None:
                pm.compile_prefill()
                compiled = pm.prefill_fn
            pm.prefill_fn = compiled if comp else eager
            if comp and "packed_check_compiled" not in res:
                res["packed_check_compiled"] = packed_check(pm, prompts[:6], rt.device)
            # the runtime's first pass of this queue: what its load-time warm-up left
            first = None
            if "first_pass" not in res:
                with FirstTimeWatch(profile=a.first_pass_profile > 0, scope=_scope(a, eng)) as first:
                    cold = run_requests(rt, prompts, outs)
                res["first_pass"] = {
                    "policy": label,
                    "runtime_warm_up_s": rt.engine.warm_up_s,
                    "profiled": bool(a.first_pass_profile),  # its times include the profiler's overhead
                    **cold,
                    **first.summary(),
                }
                print(
                    f"  mixed first pass ({label}): TTFT median {cold['ttft_ms_median']:.1f} ms, Triton JIT misses"
                    f" {len(first.misses)}, Triton kernel loads {len(first.loads)}",
                    flush=True,
                )
            t = time.perf_counter()
            run_requests(rt, prompts, outs)
            key = label if label not in res else f"{label}#{sum(k.split('#')[0] == label for k in res) + 1}"
            with FirstTimeWatch() as watch:
                res[key] = {"warmup_s": time.perf_counter() - t, **run_requests(rt, prompts, outs)}
            res[key].update(watch.summary())
            if (
                first is not None and a.first_pass_profile
            ):  # the same queue once more, profiled like the first
                with FirstTimeWatch(profile=True, scope=_scope(a, eng)) as again:
                    run_requests(rt, prompts, outs)
                res["first_pass"]["host_ops_first_vs_again"] = host_diff(first.ops, again.ops)
                res["first_pass"]["python_first_vs_again"] = host_diff(first.py, again.py)
                res["first_pass"]["again_scoped_calls_host_landed_ms"] = again.calls_ms
                print(
                    f"    scoped calls (host ms, landed ms): first {first.calls_ms}, again {again.calls_ms}"
                )
                for kind in ("host_ops_first_vs_again", "python_first_vs_again"):
                    for r in res["first_pass"][kind][:12]:
                        print(f"    {kind}: {r}", flush=True)
            res[key]["max_wait_ms"] = wait if wait < NO_AGING else None  # None: no aging
            p = [(n, round(ms, 1)) for _, n, _, ms in res[key]["prefills"]]
            print(f"  mixed {key}: TTFT median {res[key]['ttft_ms_median']:.1f} ms, prefills {p}", flush=True)
    finally:
        for k, v in zip(knobs, keep[0], strict=True):
            setattr(eng, k, v)
        pm.prefill_fn = keep[1]
    return res


@torch.no_grad()
def packed_check(pm, prompts: list[list[int]], dev) -> dict:
    """Correctness on the device: logits of prompts packed in one prefill vs each prompt alone."""
    lens = [len(p) for p in prompts]
    alone = torch.cat([pm.prefill(torch.tensor([p], device=dev), None) for p in prompts])
    last = (torch.tensor(lens).cumsum(0) - 1).to(dev)
    segs = tuple(t.to(dev) for t in pack_segments(lens))
    ids = torch.tensor([[t for p in prompts for t in p]], device=dev)
    packed = pm.prefill(ids, None, last_index=last, segments=segs)
    return {
        "max_abs_diff": float((packed - alone).abs().max()),
        "max_abs_logit": float(alone.abs().max()),
        "argmax_equal": int((packed.argmax(-1) == alone.argmax(-1)).sum()),
        "rows": len(prompts),
    }


def sec_mixed(a, dev, R):
    model = R["_model"]
    prompts, outs = mixed_workload(a.mixed_requests, vocab=model.config.vocab_size, out_max=a.mixed_out_max)
    res = {"requests": len(prompts), "useful_tokens": sum(outs)}
    rt = R.get("_mixed_rt")
    if rt is None and a.mixed_with == "bf16":
        cfg, state = config_of(model)
        rt = R["_mixed_rt"] = build_runtime(cfg, state, None, dev, torch.bfloat16, _opts(a, a.batches, R))
    if rt is not None:
        res["ours_label"] = a.mixed_with
        res["packed_check_eager"] = packed_check(rt.model, prompts[:6], dev)
        res["policies"] = mixed_policies(a, rt, prompts, outs)
        res["ours"] = res["policies"][a.mixed_policies.split(",")[0]]
    if a.mixed_peer == "none":
        return res
    hf_generate(model, prompts[:2], 4, dev)
    s, made = hf_generate(model, prompts, max(outs), dev)  # one padded batch runs to the longest output
    res["hf"] = {"seconds": s, "tokens_made": made, "useful_tokens_per_s": sum(outs) / s}
    if "ours" in res:
        res["speedup"] = res["ours"]["tokens_per_s"] / res["hf"]["useful_tokens_per_s"]
    return res


def sec_longprompt(a, dev, R):
    """Chunked prefill against one-forward prefill (the peer: prefill_chunk 0, today's default), on one runtime:
    --long-running short requests decode, then a prompt of --long-prompt-len tokens arrives. Per mode: the
    running requests' longest wait between two tokens while it is prefilled, their median gap, its time to
    first token, and whether every request's tokens equal the other mode's."""
    model = R["_model"]
    cfg, state = config_of(model)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    b = argparse.Namespace(**vars(a))  # a long enough max_seq_len for this section only, and one token a step
    b.max_seq_len = max(a.max_seq_len, a.long_prompt_len + max(a.new_tokens, 8) + 16)
    b.decode_steps = 1  # so that a wait between two tokens is one step's (a burst would add its other steps)
    rt = build_runtime(cfg, state, None, dev, dtype, _opts(b, [a.long_running + 1], R))
    eng, vocab = rt.engine, cfg.vocab_size
    shorts = random_prompts(a.long_running, 16, vocab, 5)
    long = random_prompts(1, a.long_prompt_len, vocab, 6)[0]
    res, tokens = {"long_prompt_len": len(long), "running": a.long_running}, {}
    for chunk in (0, a.long_chunk, 0, a.long_chunk):  # twice each, interleaved; the second of each is kept
        eng.prefill_chunk, eng.stats = chunk, type(eng.stats)()
        reqs = [eng.add(p, a.new_tokens) for p in shorts]
        eng.step()
        sync(dev)
        lr, seen, gaps = eng.add(long, 8), {r.id: (len(r.output), time.perf_counter()) for r in reqs}, []
        t0 = time.perf_counter()
        while lr.t_first is None:
            eng.step()
            now = time.perf_counter()
            for r in reqs:
                n, t = seen[r.id]
                if len(r.output) > n:
                    gaps.append(1e3 * (now - t))
                    seen[r.id] = (len(r.output), now)
        sync(dev)
        ttft = 1e3 * (time.perf_counter() - t0)
        while eng.has_work:
            eng.step()
        tokens[chunk] = [r.output for r in (*reqs, lr)]
        gaps = sorted(gaps)  # never empty: the step that prefills the long prompt also decodes the others
        res[f"chunk_{chunk}"] = {
            "long_ttft_ms": round(ttft, 2),
            "running_max_gap_ms": round(gaps[-1], 2),
            "running_median_gap_ms": round(gaps[len(gaps) // 2], 2),
            "steps_while_prefilling": len(gaps) // max(1, a.long_running),
            "prefill_chunks": eng.stats.prefill_chunks,
        }
    res["tokens_equal"] = tokens[0] == tokens[a.long_chunk]
    # where the chunked prompt's time goes: the GPU's kernels from its arrival to its first token
    if a.long_profile:
        for chunk in (0, a.long_chunk):
            res[f"profile_chunk_{chunk}"] = _profile_long(eng, shorts, long, chunk, a.new_tokens, dev)
            t = res[f"profile_chunk_{chunk}"]
            print(f"  longprompt chunk {chunk}: wall {t['wall_ms']:.1f} ms, GPU {t['gpu_us_per_step'] / 1e3:.1f} "
                  f"ms, groups {({k: round(v / 1e3, 1) for k, v in t['groups_us'].items()})}", flush=True)  # fmt: skip
            print(f"    host calls (ms): {t['host_calls_ms']}", flush=True)
            for r in t["host_top"][:14]:
                print(f"    host {r['self_cpu_ms']:8.2f} ms {r['calls']:6d}x {r['op']}", flush=True)
            for r in t["top"][:14]:
                print(
                    f"    {r['us_per_step'] / 1e3:8.2f} ms {r['calls_per_step']:6.0f}x {r['kernel']}",
                    flush=True,
                )
    return res


def _profile_long(eng, shorts, long, chunk: int, new: int, dev) -> dict:
    """sec_longprompt's arrival twice more: unprofiled with the host's milliseconds in each call of a step
    (_timed_calls), then under torch.profiler: the long prompt's wall ms to its first token and the GPU kernels
    and host ops over that time (the running requests' decode steps between chunks included)."""
    from torch.profiler import ProfilerActivity, profile

    eng.prefill_chunk = chunk
    times: dict[str, list[float]] = {}
    host_wall = _arrival(eng, shorts, long, new, dev, _timed_calls(eng, times))
    host = {"wall_ms": round(host_wall, 2), **{k: [round(x, 2) for x in v] for k, v in times.items()}}
    prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
    wall = _arrival(eng, shorts, long, new, dev, prof)
    ops = sorted(
        (
            {"op": e.key[:90], "self_cpu_ms": e.self_cpu_time_total / 1e3, "calls": e.count}
            for e in prof.key_averages()
        ),
        key=lambda r: -r["self_cpu_ms"],
    )[:25]
    return {"wall_ms": wall, **_kernel_table(prof, 1, top=30), "host_top": ops, "host_calls_ms": host}


def _arrival(eng, shorts, long, new: int, dev, around) -> float:
    """The short prompts admitted and decoding, then the long one arrives: wall ms to its first token, with the
    context manager `around` entered for that time only; then every request runs to its end."""
    for p in shorts:
        eng.add(p, new)
    eng.step()
    sync(dev)
    with around:
        lr, t0 = eng.add(long, 8), time.perf_counter()
        while lr.t_first is None:
            eng.step()
        sync(dev)
        wall = 1e3 * (time.perf_counter() - t0)
    while eng.has_work:
        eng.step()
    return wall


@contextlib.contextmanager
def _timed_calls(eng, times: dict[str, list[float]]):
    """While entered, the host's milliseconds in each call of the model's prefill and chunk and the engine's
    decode (each returns once its work is queued, or after its sync), appended to times[name]."""

    def wrap(obj, name):
        fn = getattr(obj, name)

        def timed(*args, **kw):
            t = time.perf_counter()
            out = fn(*args, **kw)
            times.setdefault(name.strip("_"), []).append(1e3 * (time.perf_counter() - t))
            return out

        setattr(obj, name, timed)

    wrapped = [(eng.model, "prefill"), (eng.model, "chunk"), (eng, "_decode")]
    for obj, name in wrapped:
        wrap(obj, name)
    try:
        yield
    finally:
        for obj, name in wrapped:  # the instance attributes set above; the class's methods show again
            delattr(obj, name)


def sec_hfstatic(a, dev, R):
    model = R["_model"]
    prompts = random_prompts(1, a.prompt_len, model.config.vocab_size)
    out = {}
    try:
        t = time.perf_counter()
        hf_generate(model, prompts, a.new_tokens, dev, cache_implementation="static")
        out["first_run_s"] = time.perf_counter() - t
        s, n = hf_generate(model, prompts, a.new_tokens, dev, cache_implementation="static")
        out.update({"seconds": s, "tokens": n, "tokens_per_s": n / s})
    except Exception as e:  # noqa: BLE001 - a peer failing is a result to report, not a crash of the bench
        out["error"] = f"{type(e).__name__}: {str(e)[:400]}"
    return out


def sec_e2e(a, dev, R):
    """End to end at batch 1 (prompt + new tokens, wall clock) against transformers' static cache + its
    compile, same prompt: after a warm-up of each, a.e2e_repeats timed runs of each, interleaved (peer,
    ours, peer, ours, ...) so that a drift of the device hits both; medians and the spread of the ratio."""
    model = R["_model"]
    prompts = random_prompts(1, a.prompt_len, model.config.vocab_size)
    rt = R.get("_mixed_rt")
    if rt is None:
        cfg, state = config_of(model)
        rt = R["_mixed_rt"] = build_runtime(cfg, state, None, dev, torch.bfloat16, _opts(a, a.batches, R))
    new, out = a.new_tokens, {"prompt_len": a.prompt_len, "new_tokens": a.new_tokens}
    t = time.perf_counter()
    run_requests(rt, prompts, [new])
    out["ours_first_run_s"] = time.perf_counter() - t
    t = time.perf_counter()
    hf_generate(model, prompts, new, dev, cache_implementation="static")
    out["peer_first_run_s"] = time.perf_counter() - t
    print(
        f"  e2e warm-up: ours {out['ours_first_run_s']:.1f} s, peer {out['peer_first_run_s']:.1f} s",
        flush=True,
    )
    peer, ours, ttft, decode = [], [], [], []
    for _ in range(a.e2e_repeats):
        s, n = hf_generate(model, prompts, new, dev, cache_implementation="static")
        peer.append(n / s)
        r = run_requests(rt, prompts, [new])
        ours.append(r["tokens_per_s"])
        ttft.append(r["ttft_ms_first"])
        decode.append(r["decode_tokens_per_s"])
        print(f"  e2e peer {peer[-1]:.1f} tok/s, ours {ours[-1]:.1f} tok/s", flush=True)
    med = statistics.median
    out.update(
        peer_tokens_per_s=peer,
        ours_tokens_per_s=ours,
        ours_ttft_ms=ttft,
        ours_decode_tokens_per_s=decode,
        ours_overlap_bursts=rt.engine.overlap_bursts,
        peer_median=med(peer),
        ours_median=med(ours),
        speedup_median=med(ours) / med(peer),
        speedup_worst=min(ours) / max(peer),
        speedup_best=max(ours) / min(peer),
        speedup_pairs=[o / p for o, p in zip(ours, peer, strict=True)],
        peer_spread=max(peer) / min(peer) - 1,
        ours_spread=max(ours) / min(ours) - 1,
        ours_decode_steps=rt.engine.decode_steps,
    )
    return out


def sec_cpu(a, dev, R):
    model = hf_model(a.shape, dev, torch.float32)
    cfg, state = config_of(model)
    res = {"threads": torch.get_num_threads(), "load_average": os.getloadavg()}
    for mode in ("off", "on"):
        opts = RuntimeOptions(
            compile=mode,
            max_seq_len=a.max_seq_len,
            max_batch=max(a.batches),
            batch_buckets=tuple(a.batches),
            block_size=a.block_size,
        )
        rt = build_runtime(cfg, state, None, dev, torch.float32, opts)
        t = time.perf_counter()
        res[f"compile_{mode}"] = bench_runtime(rt, a.batches, a.prompt_len, a.new_tokens, warmup=True)
        res[f"compile_{mode}"]["total_s_including_warmup"] = time.perf_counter() - t
    for b_off, b_on in zip(res["compile_off"]["results"], res["compile_on"]["results"], strict=True):
        b_on["speedup_vs_eager"] = b_on["decode_tokens_per_s"] / b_off["decode_tokens_per_s"]
    return res


def _opts(a, batches, R=None, **kw) -> RuntimeOptions:
    kw.setdefault("attention", (R or {}).get("_attn_choice", a.attention))
    kw.setdefault("dense_gemv", a.dense_gemv)
    kw.setdefault("fused_decode", a.fused_decode)
    kw.setdefault("warm_up", a.warm_up)
    kw.setdefault("inductor_pdl", a.inductor_pdl == "on")
    kw.setdefault("kernel_pdl", a.kernel_pdl == "on")
    kw.setdefault("fused_pdl", a.fused_pdl == "on")
    kw.setdefault("triton_argmax", a.triton_argmax)
    kw.setdefault("attn_last_merges", a.attn_last_merges == "on")
    kw.setdefault("overlap_bursts", a.overlap_bursts == "on")
    if a.prefill_chunk is not None:
        kw.setdefault("prefill_chunk", a.prefill_chunk)
    return RuntimeOptions(
        compile=a.compile,
        max_seq_len=a.max_seq_len,
        max_batch=max(batches),
        batch_buckets=tuple(sorted(set(batches))),
        cache_gib=a.cache_gib,
        block_size=a.block_size,
        decode_steps=a.decode_steps,
        **kw,
    )


def _kernel_table(prof, steps: int, top: int = 60) -> dict:
    """GPU kernels of `steps` profiled decode steps: total GPU ms per step and the top kernels."""
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t and e.device_type.name == "CUDA":
            rows.append({"kernel": e.key[:90], "us_per_step": t / steps, "calls_per_step": e.count / steps})
    rows.sort(key=lambda r: -r["us_per_step"])
    total = sum(r["us_per_step"] for r in rows)
    groups: dict[str, float] = {}
    for r in rows:
        k = r["kernel"].lower()
        g = (
            "int4 tinygemm"
            if "int4" in k or "tinygemm" in k
            else "gemm (cuBLAS/cutlass)"
            if any(x in k for x in ("gemm", "gemv", "cutlass", "sm90", "xmma", "splitk"))
            else "triton (inductor fused)"
            if k.startswith("triton")
            else "memcpy/memset"
            if "memcpy" in k or "memset" in k
            else "other"
        )
        groups[g] = groups.get(g, 0.0) + r["us_per_step"]
    launches = sum(r["calls_per_step"] for r in rows)
    return {"gpu_us_per_step": total, "kernels_per_step": launches, "groups_us": groups, "top": rows[:top]}


def _set_blas(dev, lib: str) -> str:
    """torch's preferred BLAS library for CUDA matmuls ('cublas' or 'cublaslt'); the CPU has neither."""
    if dev.type == "cuda":
        torch.backends.cuda.preferred_blas_library(lib)
        return lib
    return "none (cpu)"


def _recapture(rt) -> None:
    """Drop the engine's CUDA graphs: the next steps capture again (e.g. under another BLAS library: the
    compiled code calls aten's matmul, which picks its library when it runs, i.e. at capture)."""
    eng = rt.engine
    for g in (eng.greedy_fn, eng.decode_fn, eng.extend_fn, eng.prefill_graph):
        if hasattr(g, "graphs"):
            g.graphs.clear()


def _profile_steps(rt, b: int, a, dev) -> dict:
    """b requests decoding: wall ms per step over one burst, then torch.profiler's kernels of the next
    burst. overlap_bursts is off here: a burst queued behind the measured one would land in the sync."""
    from torch.profiler import ProfilerActivity, profile

    eng, keep = rt.engine, rt.engine.overlap_bursts
    eng.overlap_bursts = False
    try:
        for p in random_prompts(b, a.prompt_len, rt.config.vocab_size, b):
            eng.add(p, 64)
        for _ in range(3):  # admit + capture + warm (a step is a burst of decode_steps steps)
            eng.step()
        sync(dev)
        n0, t = eng.stats.decode_steps, time.perf_counter()
        while eng.stats.decode_steps - n0 < 8:
            eng.step()
        sync(dev)
        wall_ms = (time.perf_counter() - t) / (eng.stats.decode_steps - n0) * 1e3
        n0 = eng.stats.decode_steps
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            while eng.stats.decode_steps - n0 < 8:
                eng.step()
            sync(dev)
        steps = eng.stats.decode_steps - n0
        while eng.has_work:
            eng.step()
    finally:
        eng.overlap_bursts = keep
    return {
        "decode_steps_per_host_round_trip": eng.decode_steps,
        "profiled_steps": steps,
        "wall_ms_per_step": wall_ms,
        **_kernel_table(prof, steps),
    }


def _profile_rounds(eng, prompt: list[int], new: int, dev, rounds: int = 8) -> dict:
    """One request through a speculative engine: wall ms and tokens per round over `rounds` rounds, then
    torch.profiler's kernels of the next `rounds`. The GPU's kernel time against the wall time of a round says
    how much of it the GPU idles (the host building the next round after the round's one read)."""
    from torch.profiler import ProfilerActivity, profile

    st = eng.stats
    eng.add(prompt, new)
    for _ in range(3):  # admit + prefill, the draft's prefill, a warm round
        eng.step()
    sync(dev)
    r0, t0, t = st.spec_rounds, st.decode_tokens, time.perf_counter()
    while st.spec_rounds - r0 < rounds and eng.has_work:
        eng.step()
    sync(dev)
    n = max(st.spec_rounds - r0, 1)
    wall_ms = (time.perf_counter() - t) / n * 1e3
    tokens = (st.decode_tokens - t0) / n
    r1 = st.spec_rounds
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        while st.spec_rounds - r1 < rounds and eng.has_work:
            eng.step()
        sync(dev)
    m = max(st.spec_rounds - r1, 1)
    while eng.has_work:
        eng.step()
    table = _kernel_table(prof, m)
    return {
        "rounds_timed": n,
        "wall_ms_per_round": wall_ms,
        "tokens_per_round": tokens,
        "profiled_rounds": m,
        "gpu_idle_ms_per_round": wall_ms - table["gpu_us_per_step"] / 1e3,
        **table,
    }


def sec_pdl(a, dev, R):
    """A second bf16 runtime with inductor_pdl on (inductor's programmatic dependent launch in the compiled
    decode layers, inside the whole-step CUDA graphs), batch 1 only: decode timed 3 times interleaved with
    the profile/overlap sections' runtime (pdl off), greedy tokens compared, and its kernel profile."""
    cfg, state = config_of(R["_model"])
    base = R.get("_rt_bf16")
    if base is None:
        base = R["_rt_bf16"] = R["_mixed_rt"] = build_runtime(
            cfg, state, None, dev, torch.bfloat16, _opts(a, a.batches, R)
        )
    out = {"inductor_has_enable_pdl": hasattr(torch._inductor.config.triton, "enable_pdl")}
    pdl = build_runtime(cfg, state, None, dev, torch.bfloat16, _opts(a, [1], R, inductor_pdl=True))
    ps = random_prompts(1, a.prompt_len, cfg.vocab_size, 3)
    t = time.perf_counter()
    out["tokens_equal"] = pdl.generate_batch(ps, 64) == base.generate_batch(ps, 64)  # also compiles
    out["first_run_s"] = time.perf_counter() - t
    keys = ("decode_tokens_per_s", "decode_step_ms", "tokens_per_s")
    runs: dict = {"off": [], "on": []}
    for _ in range(3):
        for name, rt in (("off", base), ("on", pdl)):
            r = run_requests(rt, ps, [a.new_tokens])
            runs[name].append({k: r[k] for k in keys})
    out["runs"] = runs
    out["median"] = {m: {k: statistics.median(x[k] for x in runs[m]) for k in keys} for m in runs}
    print(f"  pdl batch 1: {json.dumps(out['median'])}", flush=True)
    out["profile_on_batch1"] = _profile_steps(pdl, 1, a, dev)
    return out


def sec_profile(a, dev, R):
    cfg, state = config_of(R["_model"])
    out = {}
    for label in a.profile.split(","):
        lt = label == "bf16lt"  # the bf16 runtime again, its step captured again under cuBLASLt
        rt = R.get("_rt_bf16" if lt else f"_rt_{label}")  # that section's runtime, if it ran
        if rt is None and label not in ("bf16", "bf16g", "bf16lt", "int4"):
            raise SystemExit(f"--profile {label}: run its section before profile in --sections")
        if rt is None:  # quantized only when built here (a reused int4 runtime needs no second quantization)
            fp, q = quantize_linears(state, head=a.quant_lm_head) if label == "int4" else (state, None)
            gemv = "on" if label == "bf16g" else a.dense_gemv
            rt = build_runtime(cfg, fp, q, dev, torch.bfloat16, _opts(a, a.batches, R, dense_gemv=gemv))
        if lt:
            out["bf16lt_blas"] = _set_blas(dev, "cublaslt")
            _recapture(rt)
        for b in a.batches:
            out[f"{label}_batch{b}"] = _profile_steps(rt, b, a, dev)
        out[f"{label}_dense_gemv"] = rt.options.dense_gemv
        if lt:
            _set_blas(dev, "cublas")
            _recapture(rt)
        if label in ("bf16", "bf16lt"):  # kept for bf16lt and for the e2e section (no second compile)
            R["_rt_bf16"] = R["_mixed_rt"] = rt
            continue
        del rt
        R.pop(f"_rt_{label}", None)
        torch.cuda.empty_cache() if dev.type == "cuda" else None
    return out


def spec_engine(base, draft, k: int, a, dev, speculation: str = "always", overlap: bool = False):
    """A batch-1 engine over `base`'s model and paged cache that drafts `k` tokens with `draft`'s model. A base
    with fused decode layers takes their kernels up to a verify's rows, as the loader does for a runtime loaded
    with a draft (row i of a verify then computes what a decode step computes). speculation "always": the
    speculative path's own speed; "auto" (the runtime's default): rounds only while they beat plain decoding,
    which then runs in multi-step bursts of --decode-steps as the model alone does."""
    from lorafast_export.runtime.engine import Engine
    from lorafast_export.runtime.loader import fused_mma_from
    from lorafast_export.runtime.paged import FUSED_MAX_ROWS, use_fused_decode

    dec = getattr(base.model, "dec", None)
    if dec is not None and any(getattr(layer, "fused_rows", 0) for layer in dec.model.layers):
        # the loader's choice for a runtime loaded with a draft (until session 42 this mirrored it by hand)
        use_fused_decode(dec, FUSED_MAX_ROWS, fused_mma_from(base.options, dev))
    eng = Engine(
        base.model,
        base.cache,
        max_batch=1,
        max_seq_len=base.engine.max_seq_len,
        batch_buckets=(1,),
        compile=a.compile == "on",
        device=dev,
        draft=draft.model,
        draft_cache=draft.cache,
        spec_k=k,
        speculation=speculation,
        decode_steps=1 if speculation == "always" else a.decode_steps,
        argmax=base.engine.argmax,  # option triton_argmax, as the loader passes it
        overlap_rounds=overlap,
    )
    if a.warm_up == "on" or (a.warm_up == "auto" and eng.cuda_graphs):  # as the loader does
        eng.warm_up()
    return eng


def spec_policies(a) -> list[tuple[int, str, str, bool]]:
    """(k, speculation, result key, overlap_rounds) of the spec sections: every k always (key kK), the largest
    also auto; --overlap-rounds on: every row with rounds chained on the device, ab: each always row also so
    (key kK_overlap)."""
    ks = [int(x) for x in a.spec_k.split(",")]
    on = a.overlap_rounds == "on"
    rows = [(k, "always", f"k{k}", on) for k in ks]
    if a.overlap_rounds == "ab":
        rows += [(k, "always", f"k{k}_overlap", True) for k in ks]
    return rows + [(max(ks), "auto", f"k{max(ks)}_auto", on or a.overlap_rounds == "ab")]


SPEC_KEYS = (
    "tokens_equal_bf16_alone",
    "tokens_equal_alone",
    "positions_equal",
    "tokens_equal_positions",
    "acceptance",
    "acceptance_all_prompts",
    "decode_tokens_per_s",
    "speedup_decode_vs_bf16",
    "speedup_decode_vs_alone",
    "tokens_equal_default",
    "tokens_equal_default_positions",
    "speedup_decode_vs_default_alone",
    "tokens_equal_on",
    "tokens_equal_on_positions",
    "speedup_decode_vs_on_alone",
    "speculation",
    "pauses",
    "spec_rounds",
)


def sec_spec(a, dev, R):
    """bf16 alone vs bf16 + int4 draft, batch 1, greedy; identical tokens, acceptance, decode tok/s."""
    cfg, state = config_of(R["_model"])
    fp4, q4 = quantize_linears(state)
    prompts = random_prompts(2, a.prompt_len, cfg.vocab_size, 11)
    base = build_runtime(
        cfg, state, None, dev, torch.bfloat16, _opts(a, [1], R, dense_gemv=a.spec_gemv or a.dense_gemv)
    )
    res = {}
    base.generate_batch(prompts[:1], 16)
    ref = run_requests(base, prompts[1:], [a.new_tokens])
    want = base.engine.generate_batch(prompts[1:], a.new_tokens)
    res["bf16_alone"], res["dense_gemv"] = ref, base.options.dense_gemv
    print(f"  spec bf16 alone: {ref['decode_tokens_per_s']:.1f} tok/s, gemv {res['dense_gemv']}", flush=True)
    draft = build_runtime(
        cfg, fp4, q4, dev, torch.bfloat16, _opts(a, [1], R, dense_gemv=a.spec_gemv or a.dense_gemv)
    )
    for k, policy, key, overlap in spec_policies(a):
        eng = spec_engine(base, draft, k, a, dev, policy, overlap)
        base.engine, keep = eng, base.engine
        eng.generate_batch(prompts[:1], 32)  # compile + capture
        got = eng.generate_batch(prompts[1:], a.new_tokens)
        r = run_requests(base, prompts[1:], [a.new_tokens])
        r["acceptance"] = eng.stats.acceptance
        r["tokens_equal_bf16_alone"] = got == want
        r["speedup_decode_vs_bf16"] = r["decode_tokens_per_s"] / ref["decode_tokens_per_s"]
        r["positions_equal"] = sum(x == y for g, w in zip(got, want) for x, y in zip(g, w))
        r["speculation"], r["pauses"] = policy, eng.governor.pauses
        res[key] = r
        print(f"  spec {key}: {json.dumps({x: r[x] for x in SPEC_KEYS if x in r})}", flush=True)
        base.engine = keep
    return res


def sec_specmixed(a, dev, R):
    """The mixed section's 32 requests served by a bf16 runtime loaded with the int4 draft (build_runtime's
    draft, as `--draft` loads it) under speculation "auto", the runtime's default: what attaching a draft costs a
    served queue where it does not pay (random weights: acceptance ~0). Its first pass after load and a repeat,
    beside the mixed section's runtime without a draft (run --sections mixed,specmixed in one process)."""
    cfg, state = config_of(R["_model"])
    prompts, outs = mixed_workload(a.mixed_requests, vocab=cfg.vocab_size, out_max=a.mixed_out_max)
    fp4, q4 = quantize_linears(state)
    draft = build_runtime(cfg, fp4, q4, dev, torch.bfloat16, _opts(a, a.batches, R))
    rt = build_runtime(
        cfg, state, None, dev, torch.bfloat16, _opts(a, a.batches, R, speculation="auto"), draft=draft
    )
    res = {"spec_k": rt.engine.spec_k, "runtime_warm_up_s": rt.engine.warm_up_s}
    for key in ("first_pass", "again"):
        res[key] = run_requests(rt, prompts, outs)
        print(
            f"  specmixed {key}: TTFT median {res[key]['ttft_ms_median']:.1f} ms, {res[key]['tokens_per_s']:.1f}"
            f" tok/s, rounds {res[key]['spec_rounds']}",
            flush=True,
        )
    res["pauses"] = rt.engine.governor.pauses
    alone = (R.get("mixed") or {}).get("policies", {})
    for key, other in (("first_pass", "first_pass"), ("again", "default")):
        if isinstance(alone.get(other), dict) and "tokens_per_s" in alone[other]:
            res[f"{key}_vs_no_draft"] = {
                "ttft_ms_median": alone[other]["ttft_ms_median"],
                "tokens_per_s_ratio": res[key]["tokens_per_s"] / alone[other]["tokens_per_s"],
            }
    return res


def sec_gcwatch(a, dev, R):
    """Python's garbage collector during the mixed queue (after the mixed section, on its runtime):
    --gc-passes timed passes with gc.callbacks recording each collection (generation, ms), then gc.collect() +
    gc.freeze() (what a server does after start-up: the objects alive then are never traversed again) and as many
    passes again. Per pass: TTFT median, the first prefill's landing and the collections that ran."""
    import gc

    rt = R.get("_mixed_rt")
    if rt is None:
        return {"skipped": "run the mixed section first (its runtime)"}
    prompts, outs = mixed_workload(a.mixed_requests, vocab=rt.config.vocab_size, out_max=a.mixed_out_max)
    events: list[tuple[int, float]] = []
    start: list[float] = []

    def watch(phase, info):
        if phase == "start":
            start.append(time.perf_counter())
        elif start:
            events.append((info["generation"], 1e3 * (time.perf_counter() - start.pop())))

    res: dict = {"objects_tracked": len(gc.get_objects())}
    gc.callbacks.append(watch)
    try:
        for arm in ("default", "frozen"):
            if arm == "frozen":
                gc.collect()
                gc.freeze()
                res["frozen_objects"] = gc.get_freeze_count()
            rows = []
            for _ in range(a.gc_passes):
                events.clear()
                r = run_requests(rt, prompts, outs)
                gen2 = [ms for g, ms in events if g == 2]
                rows.append(
                    {
                        "ttft_ms_median": r["ttft_ms_median"],
                        "first_prefill_ms": r["prefills"][0][3],
                        "collections": len(events),
                        "gen2": len(gen2),
                        "gen2_ms": round(sum(gen2), 2),
                        "gc_ms": round(sum(ms for _, ms in events), 2),
                    }
                )
            res[arm] = rows
            med = statistics.median
            print(
                f"  gcwatch {arm}: TTFT median of passes {med(x['ttft_ms_median'] for x in rows):.1f} ms (max"
                f" {max(x['ttft_ms_median'] for x in rows):.1f}), gen-2 collections {sum(x['gen2'] for x in rows)}"
                f" ({sum(x['gen2_ms'] for x in rows):.1f} ms), all collections {sum(x['gc_ms'] for x in rows):.1f} ms",
                flush=True,
            )
    finally:
        gc.callbacks.remove(watch)
        gc.unfreeze()
    return res


DEMO = Path(__file__).resolve().parents[1] / "lorafast_export" / "data" / "demo"


def demo_merged(dev, dtype):
    """The bundled demo base with its LoRA merged by PEFT (a trained model: drafts can be right)."""
    import peft
    import transformers

    base = transformers.AutoModelForCausalLM.from_pretrained(DEMO / "base", dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(base, DEMO / "lora").merge_and_unload()
    tok = transformers.AutoTokenizer.from_pretrained(DEMO / "base")
    return model.to(dev, dtype).eval(), tok


def code_prompts(tok, n: int, length: int) -> list[list[int]]:
    """Python standard-library source (the LoRA's domain), cut into prompts of `length` tokens."""
    import inspect
    import json as json_mod

    ids = tok(inspect.getsource(json_mod.decoder) + inspect.getsource(json_mod.encoder))["input_ids"]
    return [ids[i * length : (i + 1) * length] for i in range(n)]


def _median_run(rt, prompts, new: int, repeats: int, before=None) -> dict:
    """run_requests `repeats` times (each after `before()` where given): the run with the median decode rate, every
    run's rate beside it. A demo-sized request decodes in 12-21 ms on an H200, where one timed pass moved by 1.5x
    between calls (session 24)."""
    runs = []
    for _ in range(max(1, repeats)):
        if before is not None:
            before()
        runs.append(run_requests(rt, prompts, [new]))
    runs.sort(key=lambda r: r["decode_tokens_per_s"] or 0.0)
    r = runs[len(runs) // 2]
    r["decode_tokens_per_s_repeats"] = [x["decode_tokens_per_s"] for x in runs]
    return r


def sec_specdemo(a, dev, R):
    """Speculative decoding on the trained demo (LoRA merged): int4 RTN g32 draft, batch 1, greedy; at most 128 new
    tokens (the demo's prompts are 48), each row timed --spec-repeats times (the median run)."""
    dtype = torch.bfloat16 if dev.type == "cuda" and a.specdemo_dtype == "bf16" else torch.float32
    model, tok = demo_merged(dev, dtype)
    cfg, state = config_of(model)
    return _spec_trained(
        a, dev, R, "specdemo", cfg, state, code_prompts(tok, 5, 48), dtype, 32, _draft_head(a)
    )


def sec_specwide(a, dev, R):
    """The trained demo (LoRA merged) laid into the --shape's widths and depth (scripts/make_model.py widen: the
    same function up to rounding, the 8B's bytes a step), bf16, with an int4 RTN g128 draft of it (its lm_head too
    with --quant-lm-head: the verify is the bf16 model, so the output cannot change): speculative decoding at a
    real shape with acceptance that means something. Rows as specdemo's."""
    from scripts.make_model import widen

    kw = SHAPES[a.shape]
    keys = (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
    )
    shape = dict(zip(("hidden", "inter", "layers", "heads", "kv_heads"), (kw[k] for k in keys), strict=True))
    shape |= {"vocab": kw["vocab_size"], "max_pos": kw["max_position_embeddings"]}
    model, tok = demo_merged("cpu", torch.float32)
    small = json.loads((DEMO / "base" / "config.json").read_text())
    t0 = time.perf_counter()
    hf_cfg, state = widen(small, model.state_dict(), shape, torch.bfloat16, dev)
    del model
    cfg = ModelConfig.from_dict(hf_cfg)
    print(f"  specwide: the demo widened to {a.shape} in {time.perf_counter() - t0:.1f} s", flush=True)
    return _spec_trained(
        a, dev, R, "specwide", cfg, state, code_prompts(tok, 5, 48), torch.bfloat16, 128, _draft_head(a)
    )


def _draft_head(a) -> str:
    """The spec sections' draft lm_head: --draft-head, int4 with --quant-lm-head (the flag of the int4 sections)."""
    return "int4" if a.quant_lm_head else a.draft_head


def _spec_trained(a, dev, R, name, cfg, state, prompts, dtype, group, head="int8"):
    """bf16 alone, then with an int4 RTN draft (group; its lm_head `head`: stored, int8 per channel as
    `--speculative int4` quantizes it at load, or int4 RTN g128) under each spec policy: acceptance over all
    prompts, the median of --spec-repeats timed runs of one prompt, tokens equal to the model alone."""
    fp4, q4 = quantize_linears(state, 4, group, False, head=head == "int4")
    if head == "int8":
        fp4, q4, _ = _int8_head(cfg, fp4, q4)
    new = min(a.new_tokens, 128)
    refs: dict = {}
    if a.spec_vs_default:  # the draft-less runtimes alone first (each released before the next loads)
        # the default options; on CUDA also the CUDA-core kernels (fused_decode on: the fastest at one row)
        for ref, fused in (("default", "auto"), ("on", "on"))[: 2 if dev.type == "cuda" else 1]:
            d_rt = build_runtime(
                cfg, state, None, dev, dtype, _opts(a, [1], R, dense_gemv="auto", fused_decode=fused)
            )
            d_rt.generate_batch(prompts[:1], 8)
            refs[ref] = {"tokens": d_rt.generate_batch(prompts[1:], new)}
            refs[ref]["alone"] = _median_run(d_rt, prompts[1:2], new, a.spec_repeats)
            del d_rt
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    o = _opts(a, [1], R, dense_gemv=a.spec_gemv or a.dense_gemv)
    base = build_runtime(cfg, state, None, dev, dtype, o)
    base.generate_batch(prompts[:1], 8)
    res = {"dtype": str(dtype), "prompts": len(prompts) - 1, "new_tokens": new, "dense_gemv": o.dense_gemv}
    res["draft"] = {"bits": 4, "group": group, "lm_head": head}
    want = base.generate_batch(prompts[1:], new)
    res["timed_repeats"] = a.spec_repeats
    res["bf16_alone"] = _median_run(base, prompts[1:2], new, a.spec_repeats)
    for ref, d in refs.items():
        res[f"{ref}_alone"] = d["alone"]
        res[f"alone_tokens_equal_{ref}"] = want == d["tokens"]
    print(f"  {name} alone: {res['bf16_alone']['decode_tokens_per_s']:.1f} tok/s, {res}"[:300], flush=True)
    draft = build_runtime(cfg, fp4, q4, dev, dtype, o)
    keep = base.engine
    for k, policy, key, overlap in spec_policies(a):
        eng = spec_engine(base, draft, k, a, dev, policy, overlap)
        base.engine = eng
        got = eng.generate_batch(prompts[1:], new)  # also compiles and captures
        acc = eng.stats.acceptance
        govs = []

        def fresh(eng=eng, policy=policy, govs=govs):
            """auto: each timed run judged afresh on the warm engine, as a new process would (the run above timed
            rounds that compiled), its governor kept"""
            if policy == "auto":
                eng.governor = SpecGovernor(policy)
                govs.append(eng.governor)

        r = _median_run(base, prompts[1:2], new, a.spec_repeats, fresh)
        if govs:
            r["governor_decisions"] = [list(g.decisions) for g in govs]
            print(f"  {name} {key} governor: {json.dumps(r['governor_decisions'])}"[:1500], flush=True)
        r["acceptance_all_prompts"] = acc
        r["tokens_equal_alone"] = got == want
        r["tokens_equal_positions"] = sum(x == y for g, w in zip(got, want) for x, y in zip(g, w))
        r["speedup_decode_vs_alone"] = r["decode_tokens_per_s"] / res["bf16_alone"]["decode_tokens_per_s"]
        for ref, d in refs.items():  # against the default runtime alone (no draft), and fused_decode=on's
            r[f"tokens_equal_{ref}"] = got == d["tokens"]
            r[f"tokens_equal_{ref}_positions"] = sum(
                x == y for g, w in zip(got, d["tokens"]) for x, y in zip(g, w)
            )
            r[f"speedup_decode_vs_{ref}_alone"] = r["decode_tokens_per_s"] / d["alone"]["decode_tokens_per_s"]
        r["speculation"] = policy
        r["pauses"] = sum(g.pauses for g in govs) if govs else eng.governor.pauses  # auto: every timed run's
        if a.spec_profile == "on" and policy == "always":
            r["profile"] = _profile_rounds(eng, prompts[1], new, dev)
            pr = r["profile"]
            print(f"  {name} {key} profile: {pr['wall_ms_per_round']:.2f} ms a round ({pr['tokens_per_round']:.2f}"
                  f" tokens), GPU {pr['gpu_us_per_step'] / 1e3:.2f} ms, {pr['kernels_per_step']:.0f} kernels", flush=True)  # fmt: skip
        res[key] = r
        print(f"  {name} {key}: {json.dumps({x: r[x] for x in SPEC_KEYS if x in r})}", flush=True)
        base.engine = keep
    return res


def sec_tritoncheck(a, dev, R):
    """The Triton paged decode kernel vs the gather reference on the device (the CUDA run of
    tests/runtime/test_triton_attention.py's cases), bf16 and fp32, plus its time vs gather."""
    from lorafast_export.runtime.attention import decode_gather
    from lorafast_export.runtime.triton_attention import paged_decode
    from lorafast_export.testing import TRITON_DECODE_CASES as CASES
    from lorafast_export.testing import scattered_pool

    rows = []
    for lengths, hkv, hq, d, window in CASES + [([384] * 32, 8, 32, 128, None), ([384], 8, 32, 128, None)]:
        for dtype in (torch.float32, torch.bfloat16):
            k_pool, v_pool, tables, lens, _ = scattered_pool(lengths, hkv=hkv, d=d, bs=16)
            q = torch.randn(len(lengths), hq, 1, d)
            k_pool, v_pool, q = (t.to(dev, dtype) for t in (k_pool, v_pool, q))
            tables, lens = tables.to(dev), lens.to(dev)
            ref = decode_gather(q.float(), k_pool.float(), v_pool.float(), tables, lens, 16, window)[:, :, 0]
            out = paged_decode(q[:, :, 0], k_pool, v_pool, tables, lens, 16, window or 0).float()
            row = {
                "lengths": lengths[:4],
                "rows": len(lengths),
                "hq": hq,
                "hkv": hkv,
                "d": d,
                "window": window,
            }
            row.update(
                dtype=str(dtype), max_abs_err=(out - ref).abs().max().item(), ref_max=ref.abs().max().item()
            )
            if dtype == torch.bfloat16 and d == 128:
                gat = torch.compile(decode_gather, dynamic=False)
                args = (q, k_pool, v_pool, tables, lens, 16)
                row["triton_us"] = 1e6 * timeit(lambda x=args: paged_decode(x[0][:, :, 0], *x[1:], 0), dev)
                row["gather_compiled_us"] = 1e6 * timeit(lambda x=args, f=gat: f(*x), dev)
            rows.append(row)
    return rows


def sec_int8k(a, dev, R):
    """Our Triton int8 weight-only kernels (runtime/triton_int8.py) vs the dense bf16 matmul, per fused
    linear of the shape, at each of kernel_tune.INT8_ENTRIES' row counts (1, 32 and prefills' 128 and 1,024):
    `tune-kernels`' int8 measurement (kernel_tune.measure_int8: CUDA-graph replay of calls that cycle through
    weight copies; every entry first checked against the dequantized matmul), with every kind's best kept.
    --int8-table PATH also writes the runtime's int8 table (runtime/int4_table.py, `int8_plan_from_table`),
    replacing the rows of the shapes measured here in a table already there and keeping the others.
    --int8-shapes: linears (the decoder's four), head (the lm_head [vocab, hidden]: the torch-compile target's
    int8 head), or both."""
    from lorafast_export.runtime.kernel_tune import INT8_ENTRIES, int8_weight, measure_int8

    c = SHAPES[a.shape]
    h, i, hq, hkv = (
        c[x] for x in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads")
    )
    rows, table = [], {"gpu": R["env"]["gpu"], "torch": torch.__version__, "shapes": []}
    table["weights"] = "RTN int8 per channel asymmetric, fp16 scales, bf16 activations; CUDA graph replay"
    shapes = {"linears": layer_shapes((h, i, hq, hkv, h // hq)), "head": [(c["vocab_size"], h)]}
    measured = [nk for name in a.int8_shapes.split(",") for nk in shapes[name]]
    if a.int8_table and Path(a.int8_table).is_file():
        table = json.loads(Path(a.int8_table).read_text())
        table["shapes"] = [r for r in table["shapes"] if (r["n"], r["k"]) not in measured]
    for n, k in measured:
        wd, packs = int8_weight(n, k, dev)
        cells = {}
        for m, entries in INT8_ENTRIES.items():
            cell = measure_int8(wd, packs, m, entries)
            row = {"n": n, "k": k, "rows": m, **cell}
            if cell["us"] is not None:
                row["speedup_vs_bf16"] = cell["bf16_us"] / cell["us"]
                cells[str(m)] = {x: cell[x] for x in ("bf16_us", "us", "entry")}
            rows.append(row)
            print(f"  int8k {json.dumps(row)}", flush=True)
        table["shapes"].append({"model": a.shape, "n": n, "k": k, "rows": cells})
        if a.int8_table:
            Path(a.int8_table).write_text(json.dumps(table, indent=1))
        del wd, packs
    return rows


def sec_w8a8k(a, dev, R):
    """A SmoothQuant layer (int8 per-channel weights, int8 per-token activations) of each of the shape's
    linears, at --w8a8-rows: the dense product in the compute dtype (bf16 on CUDA, float32 on the CPU), the
    layer as auto lowered it before session 34 (fake-quant activations, then on the CPU aten's int8 weight-only
    product, on CUDA `dequant` or our Triton int8 kernel with the int8 table's plan where one is shipped) and W8A8Linear (the int8 GEMM), each module
    under torch.compile as the runtime runs it. CUDA: graph replay over weight copies (runtime/kernel_tune
    .graph_us); CPU: the median of 5 timed calls (timeit). Every output is checked against the float32 fake-quant
    product first."""
    from lorafast_export.runtime.kernel_tune import graph_us, n_copies

    torch._dynamo.config.recompile_limit = 1024  # every copy and row count its own graph, never eager
    act = torch.bfloat16 if dev.type == "cuda" else torch.float32
    counts = [int(r) for r in a.w8a8_rows.split(",")]
    rows = []
    for name, (n, k) in _linear_shapes(a.shape).items():
        torch.manual_seed(0)
        w = torch.randn(n, k, device=dev) * 0.02
        qt = with_fields(quantize_rtn(w, 8, -1, True), act_quant=ACT_QUANT_INT8_PER_TOKEN)
        copies = n_copies(n * k * 2, dev)
        kinds = _w8a8_layer_kinds(qt, w.to(act), act, dev)
        del w
        for kind, make in kinds.items():
            mods = [torch.compile(make()) for _ in range(copies if dev.type == "cuda" else 1)]
            for m in counts:
                x = torch.randn(m, k, device=dev, dtype=act) * 3
                ref = QLinear(qt)(x.float())
                row = {"linear": name, "n": n, "k": k, "rows": m, "kind": kind}
                try:
                    with torch.no_grad():
                        y = mods[0](x)
                        row["rel_err"] = ((y.float() - ref).norm() / ref.norm()).item()
                        if dev.type == "cuda":
                            row["us"] = graph_us(lambda j, x=x, ms=mods: ms[j](x), len(mods))
                        else:
                            row["us"] = timeit(lambda x=x, ms=mods: ms[0](x), dev, iters=5, warmup=1) * 1e6
                except Exception as ex:  # noqa: BLE001 - a kernel that fails is a result
                    row["error"] = f"{type(ex).__name__}: {ex}"[:300]
                rows.append(row)
                print(f"  w8a8k {json.dumps(row)}", flush=True)
            del mods
    by = {(r["linear"], r["rows"], r["kind"]): r.get("us") for r in rows}
    table = []
    for (lin, m, kind), us in by.items():
        dense = by.get((lin, m, "dense"))
        if kind != "dense" and us and dense:
            table.append(
                {"linear": lin, "rows": m, "kind": kind, "us": us, "dense_us": dense, "speedup": dense / us}
            )
    return {"rows": rows, "vs_dense": table}


def _w8a8_layer_kinds(qt, wd: torch.Tensor, act: torch.dtype, dev) -> dict:
    """sec_w8a8k's modules, by kind: each call makes a new copy (its own weights: no copy is read from the L2
    that another left there)."""
    from lorafast_export.runtime.linear import (
        DequantLinear,
        Int8Linear,
        Int8TritonLinear,
        W8A8Linear,
        int8_table_plan,
    )

    def fresh():
        return with_fields(qt, codes=qt.codes.clone())

    def cublas_only():  # W8A8Linear's cuBLAS int8 GEMM, what ran below 32 rows before session 35
        mod = W8A8Linear(fresh(), None, act, dev)
        mod.triton = False
        return mod

    kinds = {
        "dense": lambda: _DenseLinear(wd.clone()),
        "w8a8": lambda: W8A8Linear(fresh(), None, act, dev),
    }
    if dev.type == "cuda":
        kinds["w8a8_cublas"] = cublas_only
    plan = int8_table_plan(qt, dev, act)
    if (
        dev.type == "cpu"
    ):  # per-channel int8 on the CPU: aten._weight_int8pack_mm on the fake-quant activations
        kinds["before_int8_weight_only"] = lambda: _pack_only(Int8Linear(fresh(), None, act, dev))
    elif plan is not None:
        kinds["before_int8_triton"] = lambda: Int8TritonLinear(fresh(), None, act, dev, plan=plan)
    else:
        kinds["before_dequant"] = lambda: DequantLinear(fresh(), None, act, dev)
    return kinds


def _pack_only(mod):
    """An Int8Linear that runs aten's pack product at every row count, as before session 35."""
    mod.PACK_ROWS = 1 << 30
    return mod


def sec_int8cpu(a, dev, R):
    """CPU: an int8 weight-only layer (per channel, symmetric: `--quant int8`) of each of the shape's linears at
    --w8a8-rows, float32 and bf16 activations: the dense weight (`dequant`), aten's pack product at every row
    count (Int8Linear before session 35) and what auto lowers now (its kernel named), each under torch.compile;
    the median of 5 timed calls. Every output is checked against the fake-quant product first."""
    from lorafast_export.runtime.linear import DequantLinear, Int8Linear, lower_qtensor

    torch._dynamo.config.recompile_limit = 1024
    counts = [int(r) for r in a.w8a8_rows.split(",")]
    rows = []
    for name, (n, k) in _linear_shapes(a.shape).items():
        torch.manual_seed(0)
        qt = quantize_rtn(torch.randn(n, k) * 0.02, 8, -1, True)
        for act in (torch.float32, torch.bfloat16):
            auto = lower_qtensor(qt, dev, act)
            kinds = {
                "dense": DequantLinear(qt, None, act, dev),
                "pack": _pack_only(Int8Linear(qt, None, act, dev)),
                f"auto_{auto.kernel}": auto,
            }
            for kind, mod in kinds.items():
                mod = torch.compile(mod)
                for m in counts:
                    x = torch.randn(m, k, dtype=act)
                    ref = QLinear(qt)(x.float())
                    with torch.no_grad():
                        err = ((mod(x).float() - ref).norm() / ref.norm()).item()
                        us = timeit(lambda x=x, mod=mod: mod(x), dev, iters=5, warmup=1) * 1e6
                    row = {"linear": name, "n": n, "k": k, "act": str(act)[6:], "rows": m, "kind": kind}
                    rows.append({**row, "us": us, "rel_err": err})
                    print(f"  int8cpu {json.dumps(rows[-1])}", flush=True)
    return rows


class _DenseLinear(torch.nn.Module):
    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", w)

    def forward(self, x):
        return F.linear(x, self.weight)


def sec_gemv(a, dev, R):
    """Our Triton dense GEMV (runtime/triton_gemv.py) vs cuBLAS (F.linear) per linear of the shape at 1 and
    5 rows (a decode step, a k = 4 verify), bf16, CUDA-graph replay over weight copies (bench/int4_kernels
    .py's timing); every tile config is first checked against the float product and for row independence
    (row i of the 5-row call equals the 1-row call bit for bit). Printed per cell as soon as measured."""
    from bench.int4_kernels import graph_us, n_copies
    from lorafast_export.runtime.triton_gemv import GEMV_TILES, gemv_config, gemv_launch

    act = torch.bfloat16 if dev.type == "cuda" else torch.float32
    shapes = _linear_shapes(a.shape)
    rows, t_end = [], time.perf_counter() + a.gemv_budget_s
    for name, (n, k) in shapes.items():
        torch.manual_seed(0)
        ws = [torch.randn(n, k, device=dev, dtype=act) * 0.02 for _ in range(n_copies(n * k * 2, dev))]
        counts = [int(r) for r in a.gemv_rows.split(",")]
        x5 = torch.randn(max(counts), k, device=dev, dtype=act)
        ref5 = x5.float() @ ws[0].float().T
        for m in counts:
            x = x5[:m]
            row = {"linear": name, "n": n, "k": k, "rows": m}
            row["cublas_us"] = graph_us(lambda j, x=x, w=ws: F.linear(x, w[j]), len(ws))
            row["tiles"] = {}
            for tiles in [gemv_config(n, k)] if a.gemv_tiles == "shipped" else GEMV_TILES:
                if time.perf_counter() > t_end:
                    row["cut"] = "gemv budget"
                    break
                cell = {}
                try:
                    y = gemv_launch(x, ws[0], *tiles)
                    cell["rel_err"] = ((y.float() - ref5[:m]).norm() / ref5[:m].norm()).item()
                    if m > 1:
                        cell["rows_bitwise_equal_1row"] = all(
                            torch.equal(gemv_launch(x[r : r + 1], ws[0], *tiles)[0], y[r]) for r in range(m)
                        )
                    cell["us"] = graph_us(lambda j, x=x, w=ws, t=tiles: gemv_launch(x, w[j], *t), len(ws))
                except Exception as ex:  # noqa: BLE001 - a tile that fails is a result
                    cell["error"] = f"{type(ex).__name__}: {ex}"[:200]
                row["tiles"]["x".join(map(str, tiles))] = cell
            ok = {t: c["us"] for t, c in row["tiles"].items() if "us" in c and c["rel_err"] < 2e-2}
            if ok:
                best = min(ok, key=ok.get)
                row.update(best=best, best_us=ok[best], speedup_vs_cublas=row["cublas_us"] / ok[best])
                row["TBps_best"] = n * k * 2 / ok[best] / 1e6
            row["TBps_cublas"] = n * k * 2 / row["cublas_us"] / 1e6
            rows.append(row)
            print(f"  gemv {json.dumps(row)}", flush=True)
    return rows


def _fused_call(op, x, w, tiles, r, d, nw, rope=None, gather=True):
    from lorafast_export.runtime import triton_fused as tf

    if op == "add_norm_gemv":
        return tf.add_norm_gemv_launch(x, d, nw, w, 1e-5, tiles)[1]
    if op == "add_norm_qkv_rope":  # q, then the k and v it wrote at the rows' slots
        cos, sin, kp, vp, slots, qn = rope
        q = tf.add_norm_qkv_rope_launch(x, d, nw, w, 1e-5, None, cos, sin, kp, vp, slots, qn, tiles)[1]
        if not gather:  # timed: the op alone
            return q
        return torch.cat(
            [q, kp[:, slots].transpose(0, 1).flatten(1), vp[:, slots].transpose(0, 1).flatten(1)], 1
        )
    if op == "gemv_add":
        return tf.gemv_add_launch(x, w, r, tiles)
    if op == "norm_glu":
        return tf.norm_glu_launch(x, nw, w, 1e-5, tiles)
    return tf.gemv_launch(x, w, tiles)


def _fused_ref(op, x, w, r, d, nw, rope=None):
    """What the fused op computes, in float32 from the same inputs."""
    from lorafast_export.model.decoder import rotate_half

    xf = x.float() + d.float() if op in ("add_norm_gemv", "add_norm_qkv_rope") else x.float()
    if op != "gemv_add" and op != "gemv":
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5) * nw.float()
    y = xf @ w.float().T
    if op == "add_norm_qkv_rope":  # [q | k | v] with rope on q and k, as _fused_call returns them
        cos, sin, kp, _, _, qn = rope
        hd, m = kp.shape[2], x.shape[0]
        qk = y[:, : qn + kp.shape[0] * hd].reshape(m, -1, hd)
        qk = qk * cos.float()[:, None] + rotate_half(qk) * sin.float()[:, None]
        return torch.cat([qk.flatten(1), y[:, qn + kp.shape[0] * hd :]], 1)
    if op == "norm_glu":
        gate, up = y.chunk(2, dim=-1)
        return F.silu(gate) * up
    return y + r.float() if op == "gemv_add" else y


def _rope_inputs(shape: str, rows: int, dev, act):
    """cos, sin at scattered positions, k/v pools of 4,096 slots and the rows' slots, q's columns: the inputs of
    add_norm_qkv_rope for a bench shape."""
    c = SHAPES[shape]
    hq, hkv = c["num_attention_heads"], c["num_key_value_heads"]
    hd = c["hidden_size"] // hq
    pos = torch.arange(rows, device=dev).float() * 97 + 5
    emb = pos[:, None] * (1.0 / 500000 ** (torch.arange(0, hd, 2, device=dev).float() / hd))
    emb = torch.cat([emb, emb], -1)
    kp, vp = (torch.zeros(hkv, 4096, hd, device=dev, dtype=act) for _ in range(2))
    slots = torch.arange(rows, device=dev) * 131 + 7
    return emb.cos().to(act), emb.sin().to(act), kp, vp, slots, hq * hd


def sec_fused(a, dev, R):
    """runtime/triton_fused.py. (1) Each fused op on the shape's linears at 1 and 4 rows, every tile of
    FUSED_TILES (first checked against the float product) against cuBLAS's product alone (F.linear: a lower
    bound of what the plain step spends on the same work, whose adds, norms and silu-mul are further kernels),
    CUDA-graph replay over weight copies (--fused-tiles mma-sweep: the tensor-core configurations, the fastest
    at 1 row into MMA_TABLE; mma-shipped: MMA_TABLE's). (2) Decode with fused_decode off and on (mma-*: on and
    mma) at a.fused_batches, timed 3 times interleaved (same prompts), greedy tokens compared. (3) The fused
    runtime's kernel profile at batch 1."""
    from bench.int4_kernels import graph_us, n_copies
    from lorafast_export.runtime import triton_fused as tf

    act = torch.bfloat16 if dev.type == "cuda" else torch.float32
    mma = a.fused_tiles.startswith("mma")  # the tensor-core kernels (fused_decode=mma) against the FMA ones
    lin = _linear_shapes(a.shape)
    kinds = {
        "qkv": "add_norm_gemv",
        "qkv_rope": "add_norm_qkv_rope",
        "o": "gemv_add",
        "gate_up": "norm_glu",
        "down": "gemv",
        "lm_head": "add_norm_gemv",
    }
    lin["qkv_rope"] = lin["qkv"]
    ops = {
        f"{name} {kinds[name]}": (kinds[name], *lin[name]) for name in kinds
    }  # name: (op, weight rows, cols)
    out: dict = {"ops": []}
    t_end = time.perf_counter() + a.gemv_budget_s
    for name, (op, n, k) in ops.items():
        torch.manual_seed(0)
        ws = [torch.randn(n, k, device=dev, dtype=act) * 0.02 for _ in range(n_copies(n * k * 2, dev))]
        nw = 1 + 0.1 * torch.randn(k, device=dev, dtype=act)
        x4, d4 = torch.randn(4, k, device=dev, dtype=act), torch.randn(4, k, device=dev, dtype=act)
        cols = n // 2 if op == "norm_glu" else n
        r4 = torch.randn(4, cols, device=dev, dtype=act)

        for m in (1, 4):
            x, rr, dd = x4[:m], r4[:m], d4[:m]
            rope = _rope_inputs(a.shape, m, dev, act) if op == "add_norm_qkv_rope" else None
            row = {"op": name, "n": n, "k": k, "rows": m}
            row["cublas_us"] = graph_us(lambda j, x=x, w=ws: F.linear(x, w[j]), len(ws))
            row["tiles"] = {}
            want = _fused_ref(op, x, ws[0], rr, dd, nw, rope)
            for tiles in FUSED_SWEEP(a, op, n, k):
                if time.perf_counter() > t_end:
                    row["cut"] = "budget"
                    break
                cell = {}
                try:
                    y = _fused_call(op, x, ws[0], tiles, rr, dd, nw, rope)
                    cell["rel_err"] = ((y.float() - want).norm() / want.norm()).item()
                    cell["us"] = graph_us(
                        lambda j, x=x, w=ws, t=tiles, o=(op, rr, dd, nw, rope): _fused_call(
                            o[0], x, w[j], t, *o[1:], gather=False
                        ),
                        len(ws),
                    )
                except Exception as ex:  # noqa: BLE001 - a tile that fails is a result
                    cell["error"] = f"{type(ex).__name__}: {ex}"[:200]
                row["tiles"]["x".join(map(str, tiles))] = cell
            ok = {t: c["us"] for t, c in row["tiles"].items() if "us" in c and c["rel_err"] < 2e-2}
            if ok:
                best = min(ok, key=ok.get)
                row.update(best=best, best_us=ok[best], TBps_best=n * k * 2 / ok[best] / 1e6)
            row["TBps_cublas"] = n * k * 2 / row["cublas_us"] / 1e6
            out["ops"].append(row)
            print(f"  fused op {json.dumps({k_: v_ for k_, v_ in row.items() if k_ != 'tiles'})}", flush=True)
    for row in out["ops"]:  # the runtimes below (and the table to commit) use this call's fastest tiles
        if row["rows"] == 1 and "best" in row and a.fused_tiles in ("sweep", "mma-sweep", "mma-one"):
            table = tf.MMA_TABLE if mma else tf.FUSED_TABLE
            table[ops[row["op"]]] = tuple(int(t) for t in row["best"].split("x"))
    table = tf.MMA_TABLE if mma else tf.FUSED_TABLE
    out["table"] = {"/".join(map(str, k_)): v_ for k_, v_ in table.items()}
    print(f"  fused table {json.dumps(out['table'])}", flush=True)
    if not a.fused_e2e:
        return out
    cfg, state = config_of(R["_model"])
    batches = [int(b) for b in a.fused_batches.split(",")]
    # the runtimes: fused_decode off and on, or (mma-*) on and mma; keyed "off" and "on" below
    modes = {"off": "on", "on": "mma"} if mma else {"off": "off", "on": "on"}
    rts = {
        key: build_runtime(cfg, state, None, dev, torch.bfloat16, _opts(a, batches, R, fused_decode=mode))
        for key, mode in modes.items()
    }
    out["modes"] = modes
    out["fused_layers"] = sum(
        getattr(layer, "fused_rows", 0) > 0 for layer in rts["on"].model.dec.model.layers
    )
    keys = ("decode_tokens_per_s", "decode_step_ms", "tokens_per_s", "ttft_ms_median")
    for b in batches:
        ps = random_prompts(b, a.prompt_len, cfg.vocab_size, 7 + b)
        t = time.perf_counter()
        toks = {m: rt.generate_batch(ps, 64) for m, rt in rts.items()}  # also compiles and captures
        res: dict = {"first_runs_s": time.perf_counter() - t}
        res["tokens_equal"] = toks["off"] == toks["on"]
        res["positions_equal"] = sum(
            x == y
            for ro, rn in zip(toks["off"], toks["on"], strict=True)
            for x, y in zip(ro, rn, strict=True)
        )
        runs: dict = {"off": [], "on": []}
        for _ in range(3):
            for m, rt in rts.items():
                r = run_requests(rt, ps, [a.new_tokens] * b)
                runs[m].append({k_: r[k_] for k_ in keys})
        res["runs"] = runs
        res["median"] = {m: {k_: statistics.median(x[k_] for x in runs[m]) for k_ in keys} for m in runs}
        res["speedup"] = (
            res["median"]["on"]["decode_tokens_per_s"] / res["median"]["off"]["decode_tokens_per_s"]
        )
        out[f"batch{b}"] = res
        print(
            f"  fused batch {b}: {json.dumps({k_: res[k_] for k_ in ('median', 'speedup', 'tokens_equal')})}",
            flush=True,
        )
    out["profile_on_batch1"] = _profile_steps(rts["on"], 1, a, dev)
    R["_rt_fused"] = rts["on"]
    return out


def _keep_cublas_workspaces() -> None:
    """Stands in for torch._C._cuda_clearCublasWorkspaces under LF_BENCH_KEEP_CUBLAS_WORKSPACES=1."""


def FUSED_SWEEP(a, op: str, n: int, k: int):  # noqa: N802 - the tiles the fused section times
    from lorafast_export.runtime.triton_fused import FUSED_TILES, fused_config

    # the tensor-core kernels' (BN, BK, SPLIT, warps, stages), the shipped first
    if a.fused_tiles.startswith("mma"):
        from lorafast_export.runtime.triton_fused import mma_config

        shipped = mma_config(op, n, k)
        if a.fused_tiles == "mma-shipped":
            return [shipped]
        grid = [
            (bn, bk, sp, 4, st) for bn in (64, 128) for bk in (128, 256) for sp in (1, 2, 4) for st in (3, 4)
        ]
        if a.fused_tiles == "mma-one":  # one split: _mma_one_kernel, no finishing kernel
            grid = [(bn, bk, 1, 4, st) for bn in (16, 32, 64) for bk in (128, 256) for st in (3, 4, 5)]
        return [shipped] + [c for c in grid if c != shipped]
    return FUSED_TILES if a.fused_tiles == "sweep" else [fused_config(op, n, k)]


def sec_overlap(a, dev, R):
    """Decode with overlap_bursts off and on (the engine's switch, same runtime, same graphs), at each
    batch size, a.new_tokens per request, timed 3 times each interleaved (off, on, off, ...); and whether
    both give the same greedy tokens (32 new tokens per row at the largest batch)."""
    cfg, state = config_of(R["_model"])
    rt = R.get("_rt_bf16")
    if rt is None:
        rt = R["_rt_bf16"] = R["_mixed_rt"] = build_runtime(
            cfg, state, None, dev, torch.bfloat16, _opts(a, a.batches, R)
        )
    eng, keep, out = rt.engine, rt.engine.overlap_bursts, {"decode_steps": rt.engine.decode_steps}
    keys = ("decode_tokens_per_s", "decode_step_ms", "tokens_per_s", "ttft_ms_median")
    try:
        tokens = {}
        for ov in (False, True):
            eng.overlap_bursts = ov
            ps = random_prompts(max(a.batches), a.prompt_len, cfg.vocab_size, 5)
            tokens[ov] = eng.generate_batch(ps, 32)
        out["tokens_equal"] = tokens[False] == tokens[True]
        for b in a.batches:
            ps = random_prompts(b, a.prompt_len, cfg.vocab_size, b)
            runs: dict = {"off": [], "on": []}
            for _ in range(3):
                for ov in (False, True):
                    eng.overlap_bursts = ov
                    r = run_requests(rt, ps, [a.new_tokens] * b)
                    runs["on" if ov else "off"].append({k: r[k] for k in keys})
            med = {m: {k: statistics.median(x[k] for x in runs[m]) for k in keys} for m in ("off", "on")}
            out[f"batch{b}"] = {"runs": runs, "median": med}
            print(f"  overlap batch {b}: {json.dumps(med)}", flush=True)
    finally:
        eng.overlap_bursts = keep
    return out


def _linear_shapes(shape: str) -> dict[str, tuple[int, int]]:
    """(out, in) of the decoder's fused linears and the head, by name, for a bench shape."""
    c = SHAPES[shape]
    h, i, hq, hkv, v = (
        c[x]
        for x in (
            "hidden_size",
            "intermediate_size",
            "num_attention_heads",
            "num_key_value_heads",
            "vocab_size",
        )
    )
    d = h // hq
    return {
        "qkv": ((hq + 2 * hkv) * d, h),
        "o": (h, hq * d),
        "gate_up": (2 * i, h),
        "down": (h, i),
        "lm_head": (v, h),
    }


def sec_blas(a, dev, R):
    """The dense linears' matmul under cuBLAS and cuBLASLt (torch.backends.cuda.preferred_blas_library),
    with the weight as stored ([out, in], F.linear) and pre-transposed ([in, out], x @ W), per linear of
    the shape at 1 and 32 rows: CUDA-graph replay over weight copies (bench/int4_kernels.py's timing). Each
    variant's output is checked against the float product. What a decode step's GEMMs could gain from
    another library or layout, without writing a kernel."""
    from bench.int4_kernels import graph_us, n_copies

    act = torch.bfloat16 if dev.type == "cuda" else torch.float32
    rows = []
    try:
        for name, (n, k) in _linear_shapes(a.shape).items():
            torch.manual_seed(0)
            ws = [torch.randn(n, k, device=dev, dtype=act) * 0.02 for _ in range(n_copies(n * k * 2, dev))]
            wts = [w.t().contiguous() for w in ws]
            for m in (1, 32):
                x = torch.randn(m, k, device=dev, dtype=act)
                ref = x.float() @ ws[0].float().T
                row = {"linear": name, "n": n, "k": k, "rows": m}
                for lib in ("cublas", "cublaslt"):
                    row[f"blas_{lib}"] = _set_blas(dev, lib)
                    for form, fn in (
                        ("linear", lambda j, x=x, w=ws: F.linear(x, w[j])),
                        ("t", lambda j, x=x, w=wts: x @ w[j]),
                    ):
                        y = fn(0)
                        err = ((y.float() - ref).norm() / ref.norm()).item()
                        us = graph_us(fn, len(ws))
                        row[f"{lib}_{form}_us"] = us
                        row[f"{lib}_{form}_TBps"] = n * k * 2 / us / 1e6
                        row[f"{lib}_{form}_rel_err"] = err
                rows.append(row)
                print(f"  blas {json.dumps(row)}", flush=True)
    finally:
        _set_blas(dev, "cublas")
    return rows


SECTIONS = {
    "copy": sec_copy,
    "check": sec_check,
    "kernels": sec_kernels,
    "attn": sec_attn,
    "bf16": lambda a, d, R: sec_model(a, d, R, False),
    "int4": lambda a, d, R: sec_model(a, d, R, True),
    "w8a8": lambda a, d, R: sec_model(a, d, R, "w8a8"),
    "int8": lambda a, d, R: sec_model(a, d, R, "int8"),
    "int4h8": lambda a, d, R: sec_model(a, d, R, True, head8=True),
    "int8h8": lambda a, d, R: sec_model(a, d, R, "int8", head8=True),
    "w8a8h8": lambda a, d, R: sec_model(a, d, R, "w8a8", head8=True),
    "w8a8k": sec_w8a8k,
    "w8a8check": sec_w8a8check,
    "bf16g": lambda a, d, R: sec_model(a, d, R, False, gemv="on"),
    "hf": sec_hf,
    "mixed": sec_mixed,
    "longprompt": sec_longprompt,
    "enginecheck": sec_enginecheck,
    "hfstatic": sec_hfstatic,
    "e2e": sec_e2e,
    "cpu": sec_cpu,
    "profile": sec_profile,
    "spec": sec_spec,
    "specdemo": sec_specdemo,
    "attnplan": sec_attnplan,
    "specwide": sec_specwide,
    "specmixed": sec_specmixed,
    "gcwatch": sec_gcwatch,
    "tritoncheck": sec_tritoncheck,
    "int8k": sec_int8k,
    "int8cpu": sec_int8cpu,
    "gemv": sec_gemv,
    "blas": sec_blas,
    "overlap": sec_overlap,
    "pdl": sec_pdl,
    "fused": sec_fused,
}
NEEDS_MODEL = {
    "bf16",
    "longprompt",
    "bf16g",
    "int4",
    "w8a8",
    "int8",
    "int4h8",
    "int8h8",
    "w8a8h8",
    "hf",
    "mixed",
    "hfstatic",
    "e2e",
    "profile",
    "spec",
    "overlap",
    "pdl",
    "fused",
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    p.add_argument("--sections", default="copy,check,kernels,attn,bf16,int4,hf,mixed,hfstatic")
    p.add_argument("--batch", default="1,8,32")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--max-seq-len", type=int, default=1024)
    p.add_argument(
        "--prefill-chunk", type=int, default=None, help="runtime option (default: RuntimeOptions')"
    )
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--cache-gib", type=float, default=8.0)
    p.add_argument(
        "--attention", default="auto", help="auto: the faster one in the attn section, else gather"
    )
    p.add_argument("--mixed-with", default="bf16", choices=("bf16", "int4"))
    p.add_argument("--mixed-peer", default="hf", choices=("hf", "none"), help="none: ours only (TTFT)")
    p.add_argument("--budget-s", type=float, default=1e9, help="skip sections once this much time has passed")
    p.add_argument("--threads", type=int, default=0, help="CPU intra-op threads (0: torch's default)")
    p.add_argument("--compile", default="on", choices=("on", "off"), help="profile/spec sections")
    p.add_argument("--layers", type=int, default=0, help="override the shape's layer count (0: keep)")
    p.add_argument("--spec-k", default="2,4", help="draft lengths for the spec section")
    p.add_argument(
        "--spec-repeats", type=int, default=5, help="specdemo: timed runs a row (the median is kept)"
    )
    p.add_argument(
        "--spec-profile",
        default="off",
        choices=("off", "on"),
        help="specdemo/specwide: also profile 8 rounds of each `always` row (kernels, GPU idle a round)",
    )
    p.add_argument("--decode-steps", type=int, default=8, help="greedy steps chained per host round trip")
    p.add_argument(
        "--warm-up", default="auto", choices=("off", "on", "auto"), help="runtime option, all sections"
    )
    p.add_argument(
        "--prefill-sdpa",
        default="no-cudnn",
        choices=("no-cudnn", "torch"),
        help="the prefill's SDPA backends: the runtime's (flash / efficient / math) or all of PyTorch's",
    )
    p.add_argument(
        "--single-step-peer",
        type=int,
        default=1,
        help="bf16/int4: also run decode_steps=1 on the same runtime (tokens equal? speed)",
    )
    p.add_argument("--int8-table", default="", help="int8k: also write the runtime's int8 kernel table here")
    p.add_argument("--int8-shapes", default="linears", help="int8k: linears, head or linears,head")
    p.add_argument("--mixed-requests", type=int, default=32, help="mixed section (smaller: a CPU rehearsal)")
    p.add_argument("--long-prompt-len", type=int, default=3072, help="longprompt: the long prompt's tokens")
    p.add_argument("--long-chunk", type=int, default=512, help="longprompt: prefill_chunk against 0")
    p.add_argument("--long-running", type=int, default=4, help="longprompt: requests decoding meanwhile")
    p.add_argument(
        "--long-profile", action="store_true", help="longprompt: then each mode once under torch.profiler"
    )
    p.add_argument(
        "--mixed-policies", default=",".join(MIXED_POLICIES), help="mixed: labels of MIXED_POLICIES"
    )
    p.add_argument("--dense-gemv", default="off", choices=("off", "on"), help="runtime option, all sections")
    p.add_argument(
        "--fused-decode",
        default="auto",
        choices=("off", "on", "auto", "mma"),
        help="runtime option, all sections",
    )
    p.add_argument("--fused-batches", default="1,4", help="fused: batch sizes timed off and on")
    p.add_argument("--fused-e2e", type=int, default=1, help="fused: also time the runtimes (0: the ops only)")
    p.add_argument(
        "--fused-tiles",
        default="sweep",
        choices=("sweep", "shipped", "mma-sweep", "mma-one", "mma-shipped"),
        help="fused: tiles timed (mma-sweep: the tensor-core kernels' configurations, for MMA_TABLE; mma-one: those"
        " of one split, the one-kernel op, at BN 16-64; mma-shipped: MMA_TABLE's); mma-*: the runtimes fused_decode"
        " on against mma",
    )
    p.add_argument(
        "--mma-table",
        default="",
        help="a torch_bench JSON whose fused section swept the tensor-core tiles: its table is MMA_TABLE",
    )
    p.add_argument("--spec-gemv", default="", choices=("", "off", "on"), help="spec/specdemo: dense_gemv")
    p.add_argument("--eager-peer", type=int, default=1, help="bf16: also time the eager runtime at batch 1")
    p.add_argument("--gemv-budget-s", type=float, default=40.0, help="gemv: stop sweeping tiles after this")
    p.add_argument("--gemv-rows", default="1,5", help="gemv: row counts timed")
    p.add_argument(
        "--inductor-pdl", default="off", choices=("off", "on"), help="runtime option (most sections)"
    )
    p.add_argument("--kernel-pdl", default="on", choices=("off", "on"), help="runtime option (most sections)")
    p.add_argument("--fused-pdl", default="off", choices=("off", "on"), help="runtime option (most sections)")
    p.add_argument(
        "--triton-argmax",
        default="auto",
        choices=("auto", "off", "on"),
        help="runtime option (most sections)",
    )
    p.add_argument(
        "--attn-last-merges", default="off", choices=("off", "on"), help="runtime option (most sections)"
    )
    p.add_argument(
        "--spec-vs-default",
        action="store_true",
        help="spec sections: also the default runtime alone (fused_decode and dense_gemv auto, no draft), and one "
        "with fused_decode on (the CUDA-core kernels): their decode rates and whether each row's tokens equal theirs",
    )
    p.add_argument(
        "--draft-head",
        default="int8",
        choices=("stored", "int8", "int4"),
        help="spec sections: the draft's lm_head (int8: as --speculative int4 quantizes it at load; until session 41 "
        "the spec sections kept it as stored)",
    )
    p.add_argument(
        "--quant-lm-head",
        action="store_true",
        help="int4 sections: quantize lm_head too (RTN g128, as a build with quant.quantize_lm_head)",
    )
    p.add_argument(
        "--overlap-rounds",
        default="off",
        choices=("off", "on", "ab"),
        help="spec sections: speculative rounds chained on the device (engine overlap_rounds); ab: both",
    )
    p.add_argument(
        "--overlap-bursts", default="on", choices=("off", "on"), help="runtime option (most sections)"
    )
    p.add_argument("--w8a8-rows", default="1,8,16,32,64,256", help="w8a8k: row counts")
    p.add_argument("--gemv-tiles", default="sweep", choices=("sweep", "shipped"), help="gemv: tiles timed")
    p.add_argument("--e2e-repeats", type=int, default=3, help="e2e: timed runs of ours and of the peer")
    p.add_argument("--mixed-out-max", type=int, default=256, help="cap of the mixed section's outputs")
    p.add_argument(
        "--gc-passes", type=int, default=8, help="gcwatch: timed passes before and after gc.freeze()"
    )
    p.add_argument(
        "--first-pass-profile",
        type=int,
        default=0,
        help="mixed: torch.profiler + cProfile over the first pass and over one more pass (1), or over their"
        " prefills only (2); host ops and Python functions by their excess",
    )
    p.add_argument("--specdemo-dtype", default="bf16", choices=("bf16", "fp32"), help="specdemo on CUDA")
    p.add_argument("--peer-steps", type=int, default=1, help="decode_steps of that peer run")
    p.add_argument(
        "--prefill-compile", default="auto", choices=("auto", "on", "off"), help="bf16/int4 sections"
    )
    p.add_argument(
        "--profile",
        default="bf16,int4",
        help="runtimes the profile section profiles (int4h8: after its section)",
    )
    p.add_argument("--out", default="torch_bench.json")
    a = p.parse_args()
    if os.environ.get("LF_BENCH_KEEP_CUBLAS_WORKSPACES") == "1":  # diagnosis (bench/TORCH.md, session 13):
        torch._C._cuda_clearCublasWorkspaces = (
            _keep_cublas_workspaces  # the compiled peer clears them otherwise
        )
    if a.prefill_sdpa == "torch":
        from lorafast_export.runtime import attention

        attention.PREFILL_SDPA_BACKENDS = None
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.mma_table:
        from lorafast_export.runtime import triton_fused as tf

        for key, tiles in json.loads(Path(a.mma_table).read_text())["fused"]["table"].items():
            op, n, k = key.split("/")
            tf.MMA_TABLE[op, int(n), int(k)] = tuple(tiles)
        print(f"  MMA_TABLE {tf.MMA_TABLE}", flush=True)
    a.batches = [int(x) for x in a.batch.split(",")]
    dev = torch.device(a.device)
    t0 = a.t0 = time.perf_counter()
    R: dict = {
        "env": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "device": str(dev),
            "gpu": torch.cuda.get_device_name() if dev.type == "cuda" else platform.processor(),
            "argv": sys.argv[1:],
        }
    }
    out = Path(a.out)
    for name in a.sections.split(","):
        if time.perf_counter() - t0 > a.budget_s:
            R[name] = {"skipped": "time budget"}
            continue
        if name in NEEDS_MODEL and "_model" not in R:
            R["_model"] = hf_model(a.shape, dev, torch.bfloat16, a.layers)
        t = time.perf_counter()
        try:
            R[name] = SECTIONS[name](a, dev, R)
        except Exception as e:  # noqa: BLE001 - record and go on: one call of device time must yield the rest
            R[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
        R.setdefault("section_seconds", {})[name] = time.perf_counter() - t
        from torch._dynamo.utils import counters

        R["counters"] = {k: dict(v) for k, v in counters.items() if k in ("inductor", "stats", "frames")}
        if name == "check" and R[name].get("engine_compiled_triton_tokens_equal_eager") is not True:
            R["_attn_choice"] = "gather"  # the Triton path failed its check: measure the rest with gather
        out.write_text(
            json.dumps(
                {k: v for k, v in R.items() if not k.startswith("_") or k == "_attn_choice"},
                indent=1,
                default=str,
            )
        )
        print(
            f"[{time.perf_counter() - t0:7.1f}s] {name}: {json.dumps(R[name], default=str)[:1500]}",
            flush=True,
        )


if __name__ == "__main__":
    main()
