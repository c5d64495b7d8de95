"""A runtime on a CUDA device other than the current one: everything it launches goes to its own device.

CUDA launches follow the current device, not their tensors' device: the captures' side streams, the graph
replays, Triton's launches and the NVRTC modules of runtime/cuda_int4.py (a module is loaded into one device's
context). The CPU tests check the guard's wiring and the per-device kernel cache with stand-ins for torch.cuda;
the last test runs a whole int4 runtime on cuda:1 while cuda:0 is current (it needs two GPUs).
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from lorafast_export.runtime import cuda_int4, graphs
from lorafast_export.runtime.engine import Engine
from lorafast_export.runtime.loader import Runtime


class _FakeCuda:
    """torch.cuda's current device, device context and NVRTC compile, recorded."""

    def __init__(self, monkeypatch):
        self.current, self.entered, self.compiled = 0, [], []
        fake = self

        class device:
            def __init__(self, d):
                self.idx = torch.device(d).index if not isinstance(d, int) else d

            def __enter__(self):
                self.prev, fake.current = fake.current, self.idx
                fake.entered.append(self.idx)

            def __exit__(self, *exc):
                fake.current = self.prev

        def compile_kernel(src, name, nvcc_options=()):
            fake.compiled.append((name, fake.current))
            return object()

        monkeypatch.setattr(torch.cuda, "device", device)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: fake.current)
        monkeypatch.setattr(torch.cuda, "_compile_kernel", compile_kernel)


def test_on_device_makes_the_objects_device_current_for_the_call(monkeypatch):
    fake = _FakeCuda(monkeypatch)

    class Holder:
        def __init__(self, device):
            self.device = torch.device(device)

        @graphs.on_device
        def run(self):
            return fake.current

    assert Holder("cuda:1").run() == 1 and fake.current == 0  # current again after the call
    assert Holder("cpu").run() == 0 and fake.entered == [1]  # a CPU runtime touches no CUDA device
    with pytest.raises(ZeroDivisionError):  # restored on an exception too

        class Failing(Holder):
            @graphs.on_device
            def run(self):
                raise ZeroDivisionError

        Failing("cuda:1").run()
    assert fake.current == 0


def test_the_runtimes_entry_points_are_guarded(monkeypatch):
    """Every entry point through which a runtime launches work holds its device: the engine's steps, warm-up
    and batches and the runtime's logits are `on_device` methods, and a runtime is built (kernels compiled,
    graphs captured) with its device current."""
    for fn in (Engine.step, Engine.generate_batch, Engine.warm_up, Runtime.device_logits):
        assert graphs.is_on_device(fn), fn.__qualname__
    assert not graphs.is_on_device(Engine.add)  # bookkeeping only: nothing launched
    from lorafast_export.runtime import loader

    fake = _FakeCuda(monkeypatch)
    monkeypatch.setattr(loader, "_build_runtime", lambda *a: fake.current)
    assert loader.build_runtime(None, None, None, "cuda:1", torch.bfloat16, None) == 1
    assert fake.current == 0


def test_int4_kernels_are_compiled_per_device(monkeypatch):
    """A compiled module belongs to one device's context: the MMA kernel's cache is keyed by device, and each
    device's variant is compiled with that device current."""
    fake = _FakeCuda(monkeypatch)
    cuda_int4._compiled.cache_clear()
    try:
        args = (128, 8, 1, True, 1, False, 0, cuda_int4.SUBA)
        k0 = cuda_int4._kernel(*args, device=0)
        k1 = cuda_int4._kernel(*args, device=1)
        assert k0 is not k1
        assert fake.compiled == [("int4_mma", 0), ("int4_mma", 1)]
        assert cuda_int4._kernel(*args[:-1], cuda_int4.SUBA | cuda_int4.PDL, device=1) is k1  # PDL: the same
        fake.current = 1
        assert cuda_int4._kernel(*args) is k1  # None: the current device's
        assert len(fake.compiled) == 2
    finally:
        cuda_int4._compiled.cache_clear()


def test_the_launch_guard_switches_only_when_needed(monkeypatch):
    fake = _FakeCuda(monkeypatch)
    assert isinstance(cuda_int4._on(torch.device("cuda", 0)), contextlib.nullcontext)
    assert isinstance(cuda_int4._on(torch.device("cpu")), contextlib.nullcontext)
    assert isinstance(cuda_int4._on(None), contextlib.nullcontext)
    with cuda_int4._on(torch.device("cuda", 1)):
        assert fake.current == 1
    assert fake.current == 0


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_an_int4_runtime_on_the_second_gpu_gives_the_first_gpus_tokens(tmp_path, monkeypatch):
    """A compiled int4 runtime (MMA kernels, fused decode, PDL where available, CUDA graphs) built and run on
    cuda:1 while cuda:0 is current decodes the same greedy tokens as the same runtime on cuda:0, and leaves
    cuda:0 current."""
    from lorafast_export.runtime import linear
    from lorafast_export.runtime import triton_int4 as t4
    from lorafast_export.runtime.loader import build_runtime
    from lorafast_export.runtime.options import RuntimeOptions
    from tests.runtime.helpers import quantize_all, tiny_checkpoint

    plan = [8, t4.MMA, 1, 1, 1, 0, cuda_int4.SUBA, 1 << 30, t4.GEMM, 64, 64, 1, 32, 4]
    monkeypatch.setattr(linear, "default_plan", lambda: list(plan))
    md = tiny_checkpoint(tmp_path, hidden=256, intermediate_size=512)
    fp, q = quantize_all(md, group_size=128)
    opts = RuntimeOptions(compile="on", max_seq_len=128, max_batch=2, batch_buckets=(1, 2), kernel="triton")
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 96, (n,), generator=g).tolist() for n in (5, 17)]
    torch.cuda.set_device(0)
    tokens = {}
    for dev in ("cuda:0", "cuda:1"):
        rt = build_runtime(md.config, dict(fp), dict(q), dev, torch.bfloat16, opts)
        assert torch.cuda.current_device() == 0
        tokens[dev] = rt.generate_batch(prompts, 12)
        assert torch.cuda.current_device() == 0
        assert rt.cache.k[0].device == torch.device(dev)
    assert tokens["cuda:1"] == tokens["cuda:0"]
    assert all(len(t) == 12 for t in tokens["cuda:0"])


def test_a_runtime_device_is_checked_before_anything_loads(monkeypatch):
    """A device name torch does not know, a CUDA device on a machine without one, an index past the GPUs there,
    or a device type the runtime does not run on: a clear InputError naming it and what to use."""
    from lorafast_export.errors import InputError
    from lorafast_export.runtime.loader import runtime_device

    assert runtime_device("cpu") == torch.device("cpu")
    with pytest.raises(InputError, match="'gpu': not a device name.*use cpu, cuda or cuda:N"):
        runtime_device("gpu")
    with pytest.raises(InputError, match="'meta': the runtime runs on cpu or cuda"):
        runtime_device("meta")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(InputError, match="'cuda:1' asked for, but torch sees no CUDA device"):
        runtime_device("cuda:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert runtime_device("cuda:1") == torch.device("cuda", 1)
    assert runtime_device("cuda") == torch.device("cuda")
    with pytest.raises(
        InputError, match="'cuda:2' asked for, but torch sees 2 CUDA device.*cuda:0 to cuda:1"
    ):
        runtime_device("cuda:2")
