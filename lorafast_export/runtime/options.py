"""RuntimeOptions: the torch-compile target's options (recipe.target.options), checked once, all errors at once."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from lorafast_export.errors import InputError
from lorafast_export.runtime.engine import ADMIT_ORDERS, MAX_WAIT_MS
from lorafast_export.runtime.linear import KERNELS
from lorafast_export.runtime.speculation import SPECULATION

ATTENTION = ("auto", "gather", "triton")  # flex: runtime/attention.py, not offered (wrong when compiled)
COMPILE = ("auto", "on", "off")
DENSE_GEMV = ("auto", "off", "on")
FUSED_DECODE = ("auto", "off", "on", "mma")
LM_HEAD = ("auto", "keep", "int8")
TRITON_ARGMAX = ("auto", "on", "off")


@dataclass(frozen=True)
class RuntimeOptions:
    aot: bool = False  # also write AOTInductor packages (prefill.pt2, decode.pt2) for the build device
    # lowering: a quantized artifact's lm_head stored int8 per output channel (symmetric RTN), as llama.cpp's
    # Q4_K_M keeps its output at 6 bits: half of bf16's bytes a decode step; the validation's artifact stage
    # measures it. auto = int8 where the build quantized the decoder and left the head untied in 16/32 bits;
    # keep = as the quantized form holds it (runtime/artifact.int8_head)
    lm_head: str = "auto"
    compile: str = (
        "auto"  # decode step through torch.compile: auto = on CUDA only (compile time > a short run on CPU)
    )
    attention: str = "auto"  # paged decode kernel: auto = triton on CUDA where its tiles fit (reads the pool in place), else gather
    kernel: str = "auto"  # low-bit linears: auto = native int4/int8 kernels where supported (triton: our int4/int8 Triton kernels), dequant = dense
    block_size: int = 16  # tokens per KV block
    max_batch: int = 32  # sequences decoded together
    max_seq_len: int = 0  # prompt + new tokens per sequence; 0 = min(max_position_embeddings, 4096)
    cache_tokens: int = 0  # KV pool size in tokens; 0 = max_batch * max_seq_len, capped by cache_gib
    cache_gib: float = 4.0  # cap of the default pool size
    batch_buckets: tuple[int, ...] = (1, 2, 4, 8, 16, 32)  # decode batch padded up to one of these
    prefill_tokens: int = 4096  # prompt tokens prefilled together in one packed forward (1 = one by one)
    prefill_chunk: int = 0  # a prompt longer than this is prefilled in chunks of this many tokens, one a step, the running requests decoding between them (0 = off: one forward); off: at 8B on an H100 chunks of 2048 cost an 8,192-token prompt 1.14x its first-token time and cut the running requests' longest wait 246 -> 84 ms, but its warm-up compile adds 15.5 s to the load (bench/TORCH.md, sessions 33-34)
    spec_k: int = 4  # tokens a draft model proposes per verify step (speculative decoding, --draft)
    speculation: str = (
        "auto"  # with a draft: auto = only while its rounds beat plain decoding (timed), always
    )
    decode_steps: int = 8  # greedy decode steps chained on the device per host round trip (1 = one at a time)
    admit_order: str = "shortest"  # prefill order of waiting requests: shortest prompt first, or arrival
    max_wait_ms: float = MAX_WAIT_MS  # shortest first: who waited longer is admitted first (no starvation)
    prefill_first: bool = True  # no decode step while a waiting request can be admitted (lower TTFT)
    overlap_bursts: bool = True  # queue a certain next decode burst before reading this one's tokens
    overlap_rounds: bool = True  # with a draft: queue a certain next speculative round, its inputs derived on the device, before reading this one's tokens; the same output; 8B on an H100: 307 against 294 tok/s (bench/TORCH.md, session 32)
    inductor_pdl: bool = False  # compiled decode layers: inductor's programmatic dependent launch (sm90+)
    kernel_pdl: bool = True  # our CUDA kernels (int4 MMA, paged decode attention) as programmatic dependent launches (sm90+; same outputs)
    fused_pdl: bool = False  # with kernel_pdl: the dense fused decode ops too, each asking L2 for its weights before it waits (sm90+; same arithmetic; not yet run on a GPU)
    triton_argmax: str = "auto"  # greedy picks through runtime/triton_argmax.py (two kernels over slices of the row) instead of torch's one-block argmax; the same tokens; auto = on CUDA (8B on an H100: -15 to -23 us a bf16 step, -14 to -31 us an int4 one, bench/TORCH.md session 37); on = wherever Triton runs (its interpreter included); off = torch's. true / false (before session 37) read as on / off
    attn_last_merges: bool = False  # the Triton paged decode attention as one kernel whose last program of each (row, kv head) merges the splits, no merge kernel (an int32 counter per pair); the same arithmetic; 0.14-0.16 ms slower a batch-1 8B step on an H100 (bench/TORCH.md, session 38)
    draft_int4_head: bool = False  # with a draft (--draft): its lm_head quantized to int4 at load (RTN g128) where stored in 16/32 bits and untied; the model verifies every token, so the output cannot change; a draft step reads a quarter of the head's bytes; not yet timed as a draft on a GPU
    dense_gemv: str = "auto"  # on: dense linears of <= 8 rows run our Triton GEMV (runtime/triton_gemv.py); auto: on CUDA with a draft
    fused_decode: str = "auto"  # on: dense layers at <= 8 rows run runtime/triton_fused.py's kernels; auto: on CUDA in bf16/fp16, on an H100 on the tensor cores at 1-8 rows with or without a draft (the same output either way; ~5% slower at one row than on's CUDA-core kernels, bench/TORCH.md session 43); mma: the tensor cores at 1-8 rows on any GPU
    prefill_compile: str = (
        "auto"  # torch.compile the prefill too (dynamic in its length): auto = compiled runtimes on CUDA
    )
    warm_up: str = (
        "auto"  # at load, compile and capture every step shape (Engine.warm_up); auto = on CUDA graphs
    )

    def __post_init__(self) -> None:
        problems = []
        for name, allowed in (
            ("compile", COMPILE),
            ("attention", ATTENTION),
            ("kernel", KERNELS),
            ("admit_order", ADMIT_ORDERS),
            ("prefill_compile", COMPILE),
            ("dense_gemv", DENSE_GEMV),
            ("fused_decode", FUSED_DECODE),
            ("warm_up", COMPILE),
            ("speculation", SPECULATION),
            ("lm_head", LM_HEAD),
            ("triton_argmax", TRITON_ARGMAX),
        ):
            if getattr(self, name) not in allowed:
                problems.append(f"{name}={getattr(self, name)!r}: use one of {', '.join(allowed)}")
        for name in (
            "aot",
            "prefill_first",
            "overlap_bursts",
            "overlap_rounds",
            "inductor_pdl",
            "kernel_pdl",
            "fused_pdl",
            "draft_int4_head",
            "attn_last_merges",
        ):
            if not isinstance(getattr(self, name), bool):
                problems.append(f"{name}={getattr(self, name)!r}: use true or false")
        for name in (
            "block_size",
            "max_batch",
            "max_seq_len",
            "cache_tokens",
            "prefill_tokens",
            "prefill_chunk",
            "spec_k",
            "decode_steps",
        ):
            v = getattr(self, name)
            if (
                not isinstance(v, int)
                or isinstance(v, bool)
                or v < (0 if name in ("max_seq_len", "cache_tokens", "prefill_chunk") else 1)
            ):
                problems.append(f"{name}={v!r}: use a positive integer")
        if isinstance(self.block_size, int) and self.block_size & (self.block_size - 1):
            problems.append(f"block_size={self.block_size}: use a power of two (16, 32, 64, ...)")
        if (
            not isinstance(self.max_wait_ms, int | float)
            or isinstance(self.max_wait_ms, bool)
            or not self.max_wait_ms >= 0
        ):
            problems.append(f"max_wait_ms={self.max_wait_ms!r}: use a number >= 0 (0 = arrival order)")
        if not isinstance(self.cache_gib, int | float) or self.cache_gib <= 0:
            problems.append(f"cache_gib={self.cache_gib!r}: use a positive number")
        b = self.batch_buckets
        if not b or any(not isinstance(x, int) or x < 1 for x in b) or list(b) != sorted(set(b)):
            problems.append(f"batch_buckets={list(b)!r}: use increasing positive integers, e.g. [1, 8, 32]")
        if problems:
            raise InputError("torch-compile target options:\n  - " + "\n  - ".join(problems))

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> RuntimeOptions:
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise InputError(
                f"torch-compile target options: unknown key(s) {', '.join(unknown)}; "
                f"known: {', '.join(sorted(known))}."
            )
        if isinstance(d.get("triton_argmax"), bool):  # a boolean until session 37 (runtime.json, recipes)
            d["triton_argmax"] = "on" if d["triton_argmax"] else "off"
        if "batch_buckets" in d and isinstance(d["batch_buckets"], list | tuple):
            d["batch_buckets"] = tuple(d["batch_buckets"])
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["batch_buckets"] = list(self.batch_buckets)
        return d

    def replace(self, **changes: Any) -> RuntimeOptions:
        return RuntimeOptions.from_dict({**self.to_dict(), **changes})
