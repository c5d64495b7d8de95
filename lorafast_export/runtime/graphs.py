"""Whole-step CUDA graphs: one capture per input shape (batch bucket x table width x tokens per row).

A step of a 32-layer model launches hundreds of kernels; replaying them as one graph removes the launch
gaps and the Python between them. torch.compile's own "reduce-overhead" graphs wrap the compiled region
only and cost Python bookkeeping per region at every replay; here the region is the whole step (embedding,
every compiled layer, norm, head and the greedy argmax), captured by hand as inference servers do.
Inputs are copied into static buffers before each replay; outputs are static buffers that the next
replay overwrites, so a caller reads them before it steps again.

cuBLAS keeps a workspace per (handle, stream), allocated on its first product on that stream. Allocated inside a
capture, it lives in the capturing runner's pool; found already allocated, the capture bakes in another pool's
workspace. Either way a graph could outlive its workspace's memory: another runtime of the process freed, then
torch.compile's CUDA graphs clearing the workspaces and the next capture's empty_cache releasing that pool, and
the graph's replay faulted (bench/TORCH.md, session 13). So, as torch's CUDA-graph trees do, the workspaces are
cleared before and after the warm-up and the capture: the capture allocates its own, in this runner's pool, whose
memory its graphs keep alive, and no workspace in this pool outlives the capture.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable

import torch


def device_guard(device) -> contextlib.AbstractContextManager:
    """A context in which `device` is the current CUDA device (nothing for another device type). A runtime
    holds it around all it launches: the captures' side streams, the replays, the Triton launches and the
    NVRTC modules (runtime/cuda_int4.py) all follow the current device, not the device of their tensors, so
    a runtime on cuda:1 would otherwise launch against cuda:0 while cuda:0 is current."""
    device = torch.device(device)
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def on_device(method: Callable) -> Callable:
    """A method of an object with `.device`, run under `device_guard(self.device)`."""

    @functools.wraps(method)
    def guarded(self, *args, **kwargs):
        with device_guard(self.device):
            return method(self, *args, **kwargs)

    guarded.on_device = True
    return guarded


def is_on_device(fn: Callable) -> bool:
    """Whether fn, or a function it wraps (functools.wraps chains), is an `on_device` method."""
    while fn is not None:
        if getattr(fn, "on_device", False):
            return True
        fn = getattr(fn, "__wrapped__", None)
    return False


class _Captured:
    def __init__(self, graph: torch.cuda.CUDAGraph, inputs: tuple[torch.Tensor, ...], output):
        self.graph, self.inputs, self.output = graph, inputs, output


class GraphRunner:
    """fn(*tensors) → tensor or tuple of tensors, replayed from a CUDA graph captured per input shape."""

    def __init__(self, fn: Callable, warmup: int = 2):
        self.fn, self.warmup = fn, warmup
        self.graphs: dict[tuple, _Captured] = {}
        self.pool = None  # one memory pool for every capture: the graphs never run concurrently

    def __call__(self, *inputs: torch.Tensor):
        key = tuple((t.shape, t.dtype) for t in inputs)
        cap = self.graphs.get(key)
        if cap is None:
            cap = self.graphs[key] = self._capture(inputs)
        for static, t in zip(cap.inputs, inputs, strict=True):
            static.copy_(t, non_blocking=True)
        cap.graph.replay()
        return cap.output

    @torch.no_grad()
    def _capture(self, inputs: tuple[torch.Tensor, ...]) -> _Captured:
        static = tuple(t.clone() for t in inputs)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        _clear_cublas_workspaces()
        with torch.cuda.stream(side):  # compiles (and autotunes) here, never inside the capture
            for _ in range(self.warmup):
                self.fn(*static)
        torch.cuda.current_stream().wait_stream(side)
        _clear_cublas_workspaces()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.pool):
                out = self.fn(*static)
        finally:
            _clear_cublas_workspaces()
        self.pool = graph.pool()
        return _Captured(graph, static, out)


def _clear_cublas_workspaces() -> None:
    """Frees every cuBLAS workspace of the process (the next product allocates one); see the module's note."""
    torch.cuda.synchronize()
    torch._C._cuda_clearCublasWorkspaces()
