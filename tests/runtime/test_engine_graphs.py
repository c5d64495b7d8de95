"""A compiled engine lets dynamo keep a graph for every shape its steps take: each batch bucket x block-table width.
The Triton decode attention's plan (attention.decode_plan) rounds to powers of two from 64 (row, kv head) pairs on,
which specializes the layer's graph to the table width there: an 8B runtime at the default options (buckets 1-32,
4,096 tokens: 8 widths) compiled more graphs of its layer function than dynamo's default recompile limit (8), and a
fullgraph compile then fails hard (`lorafast-export run --device cuda` stopped with FailOnRecompileLimitHit; the
benches had raised the limit for their whole process). Here dynamo's automatic dynamic shapes are off, so it
compiles one graph a shape (10 here), the most the engine can need (a small model would need a bucket of 32 or more and
minutes of the interpreter to specialize as the 8B did). CUDA, or the CPU with Triton's interpreter and dynamo's
eager backend standing in for inductor (the graphs, not their kernels, are the subject)."""
# ruff: noqa: I001 - tests.runtime.triton_device must be imported before any kernel module

import torch

from tests.runtime.triton_device import DEV  # first: sets the interpreter flag before triton loads
from lorafast_export.model.decoder import load_decoder
from lorafast_export.runtime.engine import Engine
from tests.runtime.helpers import greedy_reference, paged, tiny_checkpoint


def test_compiled_engine_keeps_a_graph_for_each_table_width(tmp_path, monkeypatch):
    real = torch.compile

    def eager(fn, **kw):  # the engine's regional compile, traced by dynamo as it is, run without inductor
        return real(fn, backend="eager", fullgraph=kw.get("fullgraph", False), dynamic=kw.get("dynamic"))

    if DEV == "cpu":
        monkeypatch.setattr(torch, "compile", eager)
    torch._dynamo.reset()
    md = tiny_checkpoint(tmp_path, hidden=64, intermediate_size=96)
    pm, cache = paged(md, attention="triton", block_size=16, num_blocks=8, device=DEV)
    eng = Engine(pm, cache, max_batch=2, max_seq_len=16 * 32, batch_buckets=(1, 2), compile=True, device=DEV)
    assert len(eng.buckets) * len(eng.widths()) == 10 > torch._dynamo.config.recompile_limit
    prompt = [5, 9, 1, 44, 3]
    # one graph a shape (config.patch: pytest's monkeypatch would delete the option on undo)
    with torch._dynamo.config.patch(automatic_dynamic_shapes=False):
        eng.warm_up()
        got = eng.generate_batch([prompt], 6)
    torch._dynamo.reset()  # the graphs compiled under the patch are not the other tests'
    assert got == [greedy_reference(load_decoder(md), prompt, 6)]
