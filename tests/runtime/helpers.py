"""Tiny checkpoints opened as canonical decoders, and the reference greedy loop over the decoder's own cache."""

from __future__ import annotations

import torch

from lorafast_export.model.decoder import Decoder, load_decoder
from lorafast_export.qform import QLinear
from lorafast_export.quant.rtn import quantize_rtn
from lorafast_export.runtime.kv_cache import CacheConfig, PagedKVCache
from lorafast_export.runtime.paged import PagedModel, build_model
from lorafast_export.weights import open_model
from tests.tiny import make_model, save_model


def tiny_checkpoint(tmp_path, family="llama", **kw):
    hf = make_model(family, **kw)
    return open_model(save_model(hf, tmp_path / family))


def fp_state(md) -> dict[str, torch.Tensor]:
    return {k: md.store.get(k) for k in md.store.keys()}


def quantize_all(md, bits=4, group_size=32, symmetric=False):
    """(fp tensors without the quantized weights, {module path: QTensor}) for every decoder linear."""
    fp, q = fp_state(md), {}
    for name in [k for k in fp if ".layers." in k and k.endswith("proj.weight")]:
        path = name.removesuffix(".weight")
        q[path] = quantize_rtn(fp.pop(name), bits, group_size, symmetric, bias=fp.pop(f"{path}.bias", None))
    return fp, q


def fake_quant_decoder(md, q) -> Decoder:
    """The canonical decoder with qform.QLinear (the fake-quant reference) in place of quantized linears."""
    dec = load_decoder(md)
    for path, qt in q.items():
        parent, _, name = path.rpartition(".")
        setattr(dec.get_submodule(parent), name, QLinear(qt))
    return dec


def paged(
    md,
    fp=None,
    q=None,
    attention="gather",
    block_size=4,
    num_blocks=64,
    dtype=torch.float32,
    kernel="auto",
    device="cpu",
):
    cfg = md.config
    dec, kernels = build_model(cfg, fp if fp is not None else fp_state(md), q, device, dtype, kernel)
    cache = PagedKVCache(
        cfg.num_layers,
        cfg.num_kv_heads,
        cfg.head_dim,
        CacheConfig(block_size=block_size, num_blocks=num_blocks),
        dtype,
        device,
    )
    return PagedModel(dec, cache, attention), cache


@torch.no_grad()
def greedy_reference(dec: Decoder, prompt: list[int], n: int) -> list[int]:
    out, past, x = [], None, torch.tensor([prompt])
    for _ in range(n):
        logits, past = dec(x, past=past)
        out.append(int(logits[0, -1].argmax()))
        x = torch.tensor([[out[-1]]])
    return out


def verify_and_steps(pm, cache, dev) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """After a 17-token prompt: the logits of a 3-token verify (one extend) and of the same 3 tokens as one-token
    decode steps, [3, V] and a list of 3 [V]; a speculative verify must give each token its step's logits."""
    prompt, new = [3, 14, 15, 92, 65, 35, 8, 9, 79, 32, 38, 46, 26, 43, 38, 32, 7], [2, 71, 82]
    n, s = len(prompt), len(new)
    cache.reserve(0, n + s)
    pm.prefill(torch.tensor([prompt], device=dev), cache.slots(0, 0, n).to(dev))
    tables = cache.block_table([0], 2, 1).to(dev)
    steps = []
    for j, t in enumerate(new):
        pos = torch.tensor([n + j], device=dev)
        slot = cache.slots(0, n + j, n + j + 1).to(dev)
        steps.append(pm(torch.tensor([t], device=dev), pos, tables, pos + 1, slot)[0])
    verify = pm.extend(
        torch.tensor([new], device=dev),
        torch.arange(n, n + s, device=dev)[None],
        tables,
        cache.slots(0, n, n + s).to(dev),
    )[0]
    return verify, steps


class ShapeRecorder:
    """Wraps a step callable and records each call's key as GraphRunner keys its captures: the inputs' shapes
    and dtypes (a key seen first outside warm-up would be a capture, and a compile, while requests wait)."""

    def __init__(self, fn):
        self.fn, self.keys = fn, set()

    def __call__(self, *inputs: torch.Tensor):
        self.keys.add(tuple((t.shape, t.dtype) for t in inputs))
        return self.fn(*inputs)


def record_step_shapes(eng, names: tuple[str, ...]) -> dict[str, ShapeRecorder]:
    """Replace the engine's step callables `names` by recorders; returns them by name."""
    recs = {n: ShapeRecorder(getattr(eng, n)) for n in names}
    for n, r in recs.items():
        setattr(eng, n, r)
    return recs


def rope_inputs(g: torch.Generator, rows: int, hkv: int, d: int, slots: int, dtype, dev):
    """A fused qkv + rope kernel's other inputs: cos, sin [rows, d] at random positions, distinct slots [rows],
    zeroed k and v pools [hkv, slots, d]."""
    pos = torch.randint(0, 500, (rows,), generator=g).float()
    inv = 1.0 / 10000 ** (torch.arange(0, d, 2).float() / d)
    emb = torch.cat([pos[:, None] * inv] * 2, dim=-1)
    cos, sin = emb.cos().to(dev, dtype), emb.sin().to(dev, dtype)
    slot = torch.randperm(slots, generator=g)[:rows].to(dev)
    kp, vp = (torch.zeros(hkv, slots, d, device=dev, dtype=dtype) for _ in range(2))
    return cos, sin, slot, kp, vp
