"""What the calibration walk hands a quantization method: one block (a decoder layer, or the final norm +
lm_head) on the compute device, its groups of linears, and the calibration activations that enter it.

A Group is a set of linears that read one input, with the op that produces that input (`prev`): the op
an AWQ/SmoothQuant scale is folded into. Groups are data (which names, which order), not code.

On CUDA the block's forward passes run under bfloat16 autocast (`compute_dtype`): the weights stay float32
(what gets quantized and folded), each matmul casts its operands to bf16 and accumulates in fp32, and
the residual stream stays float32. Statistics taken from the activations (Hessians, absmax, AWQ's losses)
are computed in float32 from what the bf16 forward produced. On the CPU everything stays float32.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn

from lorafast_export.qform import QLinear, QTensor


@dataclass(frozen=True)
class Group:
    prev: str  # module whose output feeds `linears` (a norm, or a linear whose rows can be scaled)
    linears: tuple[str, ...]  # relative module paths, in execution order
    block: str | None = (
        None  # submodule to run for AWQ's loss (the whole attention / MLP); None = the linears
    )


LAYER_GROUPS = (
    Group("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),
    Group("self_attn.v_proj", ("self_attn.o_proj",)),
    Group("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
    Group("mlp.up_proj", ("mlp.down_proj",)),
)
HEAD_GROUPS = (Group("norm", ("lm_head",)),)
REPLAY_MIN_BYTES = 1 << 30  # Block.freeze: a frozen module's recorded outputs may take this much, or x's size
CUDA_COMPUTE_DTYPE: torch.dtype | None = torch.bfloat16  # forward passes of the walk on CUDA (None: float32)


def compute_dtype(device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype of the walk's forward passes on device (None: run in float32, as on the CPU)."""
    return CUDA_COMPUTE_DTYPE if torch.device(device).type == "cuda" else None


def screen_dtype(device: torch.device | str) -> torch.dtype | None:
    """The dtype in which AWQ's scale grid first scores every candidate (awq_search_scale's `screen`; 21 forwards
    of the attention / MLP per group are most of AWQ's time) before the finalists are scored in the walk's own
    precision: bf16 on CPUs with native bf16 matmuls (AVX512-BF16 or AMX; the dev machine's EPYC runs them at
    3.7x the float32 rate). None (no screening) on CUDA, whose walk already runs in bf16, and on other CPUs."""
    if torch.device(device).type == "cuda":
        return None
    try:
        native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        native = False
    return torch.bfloat16 if native else None


def causal_kernel(device: torch.device | str, seq_len: int, sliding_window: int | None) -> bool:
    """Attention can use SDPA's causal kernels (flash) instead of a mask: on CUDA, when no sliding window
    cuts inside the sequence. The CPU keeps the explicit mask (bit-for-bit what it computed before)."""
    return torch.device(device).type == "cuda" and (sliding_window is None or sliding_window >= seq_len)


class Head(nn.Module):
    """The final norm and lm_head as one block: h → logits."""

    def __init__(self, norm: nn.Module, lm_head: nn.Module):
        super().__init__()
        self.norm, self.lm_head = norm, lm_head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(x))


def _tensors(out) -> list[torch.Tensor]:
    """The tensors of a module's output (a tensor, or nested tuples / lists of them)."""
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for o in out for t in _tensors(o)] if isinstance(out, tuple | list) else []


class _Replay(nn.Module):
    """Stands in for a frozen module during one forward: returns its recorded outputs, one per chunk, in order."""

    def __init__(self, outputs: list):
        super().__init__()
        self.outputs = iter(outputs)

    def forward(self, *args, **kwargs):
        return next(self.outputs)


class _Stop(Exception):  # noqa: N818 - control flow, not an error: the hooked input was seen, skip the rest
    pass


@dataclass
class Block:
    """A block on the compute device plus its calibration inputs x [samples, seq, hidden] (or None)."""

    module: nn.Module
    groups: tuple[Group, ...]
    x: torch.Tensor | None
    call: Callable[[nn.Module, torch.Tensor], torch.Tensor]  # module, x chunk → output chunk
    sub_args: dict[str, tuple] = field(default_factory=dict)  # extra positional args of a Group.block
    chunk: int = 1  # samples per forward (bounds the intermediate activations)
    fp_dtype: torch.dtype = torch.float32  # dtype the fp tensors (folded norms, biases) are stored in
    notes: list[str] = field(default_factory=list)  # what the method could not do here, for the manifest
    compute_dtype: torch.dtype | None = None  # autocast dtype of the forward passes (None: float32)
    screen_dtype: torch.dtype | None = None  # AWQ's first scoring of its candidates (screen_dtype())
    frozen: set[str] = field(default_factory=set)  # modules that no longer change (freeze)
    recorded: dict[str, list] = field(default_factory=dict)  # frozen module → its outputs, one per chunk

    def autocast(self, dtype: torch.dtype | None | str = "compute") -> AbstractContextManager:
        """The forward passes' precision: bf16 autocast on CUDA (weights stay float32), else nothing;
        or autocast to the dtype given (None: nothing)."""
        dtype = self.compute_dtype if dtype == "compute" else dtype
        if dtype is None or self.x is None:
            return nullcontext()
        return torch.autocast(self.x.device.type, dtype=dtype)

    def screen(self) -> Callable[[], AbstractContextManager] | None:
        """AWQ's screening context (screen_dtype), or None."""
        return None if self.screen_dtype is None else lambda: self.autocast(self.screen_dtype)

    def get(self, name: str) -> nn.Module:
        return self.module.get_submodule(name)

    def weight(self, name: str) -> torch.Tensor:
        return self.get(name).weight.detach()

    def bias(self, name: str) -> torch.Tensor | None:
        b = getattr(self.get(name), "bias", None)
        return None if b is None else b.detach()

    def set_linear(self, name: str, qt: QTensor) -> None:
        parent, _, leaf = name.rpartition(".")
        setattr(self.module.get_submodule(parent) if parent else self.module, leaf, QLinear(qt))

    def set_param(self, name: str, value: torch.Tensor) -> None:
        """Store a folded fp tensor rounded through fp_dtype, so what runs here is what gets saved."""
        module_name, _, leaf = name.rpartition(".")
        module = self.get(module_name)
        stored = value.detach().to(self.fp_dtype).to(torch.float32)
        setattr(module, leaf, nn.Parameter(stored, requires_grad=False))

    def freeze(self, linears: list[str]) -> None:
        """These linears are final (quantized; nothing folds into them any more). From the next forward on, the
        outputs of every frozen module are recorded once and then replayed instead of recomputed, and so are those
        of a container whose linears are all frozen (the whole self_attn once o_proj is): the same module on the
        same input gives the same output, so the forwards of a sequential walk (GPTQ: one per group, then the
        layer's output) stop redoing the work of the groups already quantized. Only for methods whose later
        changes (folds) never touch a frozen module, and never across a change of x."""
        self.frozen.update(linears)
        ours = [n for g in self.groups for n in g.linears]
        for name in linears:
            parts = name.split(".")
            for k in range(1, len(parts)):
                container = ".".join(parts[:k])
                if all(n in self.frozen for n in ours if n.startswith(container + ".")):
                    self.frozen.add(container)

    def _replays(self, hooked: list[str]) -> tuple[list[str], list[str]]:
        """(modules replayed in the next forward, modules recorded in it): of the frozen modules that are not, and
        do not contain, a hooked module (its hook must see its input), the outermost recorded ones, and the
        outermost not yet recorded outside those (a container is recorded while its recorded parts replay)."""

        def inside(name: str, outer: str) -> bool:
            return name.startswith(outer + ".")

        usable = [n for n in self.frozen if not any(h == n or inside(h, n) for h in hooked)]
        done = [n for n in usable if n in self.recorded]
        replay = [n for n in done if not any(inside(n, o) for o in done)]
        todo = [n for n in usable if n not in self.recorded and not any(inside(n, o) for o in replay)]
        return replay, [n for n in todo if not any(inside(n, o) for o in todo)]

    def _swap(self, name: str, module: nn.Module) -> nn.Module:
        parent, _, leaf = name.rpartition(".")
        owner = self.module.get_submodule(parent) if parent else self.module
        before = getattr(owner, leaf)
        setattr(owner, leaf, module)
        return before

    @torch.no_grad()
    def run(
        self, hooks: dict[str, Callable[[torch.Tensor], None]] | None = None, stop_after: str | None = None
    ) -> torch.Tensor | None:
        """Forward x through the block chunk by chunk; hooks[name](input of that module) per chunk.

        With stop_after, the forward of each chunk ends right after that module's input was seen and
        nothing is returned (for collecting statistics of an early module cheaply). Frozen modules (freeze)
        replay their recorded outputs, or record them in this forward.
        """
        hooks = hooks or {}
        replay, record = self._replays(list(hooks))
        chunks = self.x.split(self.chunk)
        seen: dict[str, list | None] = {n: [] for n in record}
        room = max(self.x.numel() * self.x.element_size(), REPLAY_MIN_BYTES)  # per module: one copy of x

        def keep(name: str, out) -> None:
            whole = sum(t.numel() * t.element_size() for t in _tensors(out)) * len(chunks)  # estimated
            if seen[name] is None:
                return
            if whole <= room:  # (the chunks are of one size but the last)
                seen[name].append(out)
            else:
                seen[name] = None  # too large to keep: this module is recomputed as before

        handles = [self.get(n).register_forward_hook(lambda _m, _a, out, n=n: keep(n, out)) for n in record]
        for name, fn in hooks.items():

            def pre(_m, args, fn=fn, stop=name == stop_after):
                fn(args[0])
                if stop:
                    raise _Stop

            handles.append(self.get(name).register_forward_pre_hook(pre))
        swapped = {n: self._swap(n, _Replay(self.recorded[n])) for n in replay}
        outs = []
        try:
            for xc in chunks:
                try:
                    with self.autocast():
                        outs.append(self.call(self.module, xc))
                except _Stop:
                    pass
        finally:
            for h in handles:
                h.remove()
            for n, module in swapped.items():
                self._swap(n, module)
        for n, got in seen.items():
            if got is not None and len(got) == len(
                chunks
            ):  # it ran in every chunk (a stop before it leaves nothing to replay)
                self.recorded[n] = got
                for inner in [m for m in self.recorded if m.startswith(n + ".")]:
                    del self.recorded[inner]  # replayed as part of n from now on
        return None if stop_after else torch.cat(outs)

    @torch.no_grad()
    def capture_inputs(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Full inputs [samples, seq, in] of the named modules, from one forward."""
        seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}
        self.run({n: seen[n].append for n in names}, stop_after=names[-1])
        return {n: torch.cat(v) for n, v in seen.items()}

    @torch.no_grad()
    def sub_forward(
        self,
        sub: str,
        x: torch.Tensor,
        params: dict[str, torch.Tensor],
        args_dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """Submodule `sub` on x with some of its parameters replaced (AWQ's loss), chunk by chunk. args_dtype: its
        extra float arguments (the rotary cos / sin) in this dtype (AWQ's bf16 screen: the rotation stays in bf16)."""
        module = self.get(sub)
        extra = self.sub_args.get(sub, ())
        if args_dtype is not None:
            extra = tuple(
                a.to(args_dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                for a in extra
            )
        outs = []
        for xc in x.split(self.chunk):
            with self.autocast():
                out = torch.func.functional_call(module, params, (xc, *extra))
            outs.append(out[0] if isinstance(out, tuple) else out)
        return torch.cat(outs)
