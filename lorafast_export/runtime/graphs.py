"""Whole-step CUDA graphs: one capture per input shape (batch bucket x table width x tokens per row).

A step of a 32-layer model launches hundreds of kernels; replaying them as one graph removes the launch
gaps and the Python between them. torch.compile's own "reduce-overhead" graphs wrap the compiled region
only and cost Python bookkeeping per region at every replay; here the region is the whole step (embedding,
every compiled layer, norm, head and the greedy argmax), captured by hand as inference servers do.
Inputs are copied into static buffers before each replay; outputs are static buffers that the next
replay overwrites, so a caller reads them before it steps again.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class _Captured:
    def __init__(self, graph: torch.cuda.CUDAGraph, inputs: tuple[torch.Tensor, ...], output):
        self.graph, self.inputs, self.output = graph, inputs, output


class GraphRunner:
    """fn(*tensors) → tensor or tuple of tensors, replayed from a CUDA graph captured per input shape."""

    def __init__(self, fn: Callable, warmup: int = 2):
        self.fn, self.warmup = fn, warmup
        self.graphs: dict[tuple, _Captured] = {}
        self.pool = None  # one memory pool for every capture: the graphs never run concurrently
        # Its own capture stream: cuBLAS's workspace is kept per (handle, stream), so with torch's shared default
        # capture stream a graph of this runner used the workspace another runtime's capture had allocated in
        # that runtime's pool; once that runtime was freed and torch.compile's CUDA graphs cleared the cuBLAS
        # workspaces (transformers' static-cache generate in the same process), the pool was released under
        # the graph and its next replay faulted (bench/TORCH.md, session 13). On this stream the workspace is
        # allocated by this runner's first capture, in this runner's pool, which its graphs keep alive.
        self.stream = None

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
        with torch.cuda.stream(side):  # compiles (and autotunes) here, never inside the capture
            for _ in range(self.warmup):
                self.fn(*static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        if self.stream is None:
            self.stream = torch.cuda.Stream()
        with torch.cuda.graph(graph, pool=self.pool, stream=self.stream):
            out = self.fn(*static)
        self.pool = graph.pool()
        return _Captured(graph, static, out)
