"""Stage weights one decoder layer at a time: each validation stage as a LayerSource.

A LayerSource builds, on the validation device and in float32, the pieces of one model that the layer-streamed
evaluator (validate/stream.py) needs in turn: the token embedding, decoder layer i, and the head (final norm +
lm_head). Nothing holds more than one layer of a stage; tensors that several stages start from (the base
checkpoint's layer, the fp32 merge of it) are read once per layer into `shared`, a dict the evaluator clears
after each layer.

Stages:
- UnmergedSource: the reference, base + adapters applied UNMERGED as PEFT computes them in eval mode
  (y = W x + b + s·B(A x); DoRA as peft/tuners/lora/dora.py; embedding LoRA; modules_to_save; several weighted
  adapters). tests/validate/test_layers.py proves it equal to PEFT's unmerged model.
- StoreSource: a checkpoint's tensors as stored (the bare base; the merged checkpoint; an artifact read back).
- MergedSource: the merge computed on the device (merge.merge_onto, the function the written checkpoint comes
  from), optionally rounded to the checkpoint dtype (merged-bf16 of a build that merges on read).
- QuantizedSource: a QuantizedModel's codes dequantized per layer (what model.quantized.fake_quant_decoder runs).
- DecoderSource: an already built whole Decoder (small models, tests).
Every stage computes in float32 with float32 logits, whatever its stored dtype: bf16 weights are exact in fp32.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from lorafast_export.model.decoder import Decoder, DecoderLayer, RMSNorm, Rotary
from lorafast_export.model.spec import EMBED, FINAL_NORM, LM_HEAD, ModelConfig, layer_prefix
from lorafast_export.validate.resident import to_device

Shared = dict  # per-layer memo shared by all stages: key -> tensor on the device


def _onednn_ok() -> bool:
    """Whether this torch runs a float32 linear through oneDNN as `linear` needs it (checked once): an IEEE
    float32 product whose rows do not depend on how many rows (two or more) come together. The walk relies on that
    (a block's logits are equal whether its stages or chunks run together or alone). torch 2.13's oneDNN gives it
    (a lone row may take another path); torch 2.11's does not (rows below 16 change with the batch), so there
    `linear` stays on torch's own product."""
    global _ONEDNN
    if _ONEDNN is None:
        try:
            g = torch.Generator().manual_seed(0)
            x, w, b = (
                torch.randn(67, 384, generator=g),
                torch.randn(96, 384, generator=g),
                torch.randn(96, generator=g),
            )
            op = torch.ops.mkldnn._linear_pointwise
            full = op(x, w, b, "none", [], "")
            exact = x.double() @ w.double().T + b.double()
            _ONEDNN = bool(
                torch.backends.mkldnn.is_available()
                and (full.double() - exact).abs().max() <= 1e-5 * exact.abs().max()
                and all(torch.equal(op(x[:m], w, b, "none", [], ""), full[:m]) for m in (2, 5, 33))
            )
        except (AttributeError, RuntimeError):
            _ONEDNN = False
    return _ONEDNN


_ONEDNN: bool | None = None


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, except a float32 product on a CPU goes through oneDNN: torch's float32 CPU matmul is MKL's
    sgemm, which on this project's AMD development CPU (AVX-512) ran at 45-85 GFLOP per CPU-second on the
    walk's shapes against 130-180 for oneDNN, in IEEE float32 both (no reduced-precision mode), where this
    torch's oneDNN keeps rows independent of the batch (_onednn_ok). Validation's own stages, and the transformers
    + PEFT reference's logits through OneDnnLinears (its greedy generate keeps torch's product)."""
    if x.device.type == "cpu" and x.dtype == w.dtype == torch.float32 and _onednn_ok():
        return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
    return F.linear(x, w, b)


class OneDnnLinears(TorchFunctionMode):
    """Within it, F.linear (every nn.Linear, PEFT's LoRA layers included) runs through `linear`: how the
    transformers + PEFT reference computes its logits on a CPU, 1.8x faster there in float32 (two demo forwards
    of 8 blocks: 0.31 s of CPU against 0.55 s with MKL). Same modules, same order of operations; only the GEMM
    kernel changes."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.linear:
            return linear(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


class _Linear(nn.Module):
    """nn.Linear's forward through `linear` (the layers the walk builds)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.weight, self.bias = weight, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


@dataclasses.dataclass
class Head:
    """Final norm + lm_head of one stage, resident on the device while its logits are computed."""

    norm: RMSNorm
    linear: Callable[[torch.Tensor], torch.Tensor]  # normed hidden [n, H] fp32 -> logits [n, V] fp32

    weight: torch.Tensor | None = (
        None  # the lm_head weight as stored, when `linear` is a plain product with it
    )

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(h)).float()

    def cache_weights(self, copies: dict) -> None:
        """Keep a float32 copy of a plain head's weight (a low-precision one is otherwise upcast at each call);
        `copies` (id of the stored weight -> copy) lets stages that share a head share the copy."""
        if self.weight is not None and self.weight.dtype != torch.float32:
            key = id(self.weight)
            if key not in copies:
                copies[key] = (self.weight, self.weight.float())  # the original kept alive: ids stay unique
            w = copies[key][1]
            self.linear, self.weight = (lambda h: linear(h, w)), w


class LayerSource:
    """Base class: tensors by HF name from `tensor(name, device, shared)`; linears may be replaced by
    `linear(path, device, shared)` (a module, or None for a plain nn.Linear from the tensors)."""

    name: str
    config: ModelConfig

    def tensor(self, name: str, device, shared: Shared) -> torch.Tensor:
        raise NotImplementedError

    def linear(self, path: str, device, shared: Shared) -> nn.Module | None:
        return None

    def embed(self, ids: torch.Tensor, shared: Shared) -> torch.Tensor:
        """ids [b, s] on the device -> hidden [b, s, H] float32."""
        return F.embedding(ids, self.tensor(EMBED, ids.device, shared).float())

    def layer(self, i: int, device, shared: Shared) -> nn.Module:
        with torch.device("meta"):
            lay = DecoderLayer(self.config)
        p = layer_prefix(i)
        for rel in lay.linears():
            mod = self.linear(p + rel, device, shared)
            if mod is not None:
                parent, _, leaf = rel.rpartition(".")
                setattr(lay.get_submodule(parent), leaf, mod)
        need = [n for n, t in [*lay.named_parameters(), *lay.named_buffers()] if t.is_meta]
        lay.load_state_dict(
            {n: self.tensor(p + n, device, shared).float() for n in need}, strict=False, assign=True
        )
        for rel, mod in lay.linears().items():  # plain linears run through `linear`
            if type(mod) is nn.Linear:
                parent, _, leaf = rel.rpartition(".")
                setattr(lay.get_submodule(parent), leaf, _Linear(mod.weight, mod.bias))
        return lay.eval()

    def head(self, device, shared: Shared) -> Head:
        norm = RMSNorm(self.config.hidden_size, self.config.rms_norm_eps)
        norm.weight = nn.Parameter(self.tensor(FINAL_NORM, device, shared).float(), requires_grad=False)
        mod = self.linear("lm_head", device, shared)
        if mod is None:
            w = self.tensor(self.head_weight_name(), device, shared)
            return Head(norm, lambda h: linear(h, w.float()), w)
        return Head(norm, mod)

    def head_weight_name(self) -> str:
        return EMBED if self.config.tie_word_embeddings else LM_HEAD

    def decoder(self, device, on_demand: bool | None = None) -> Decoder:
        """The whole model on the device for greedy decoding: it holds every layer, except where the source
        builds its layers from device-resident tensors or on_demand is set (then each layer is built again at
        each step: one layer's fp32 weights at a time)."""
        return BuiltDecoder(
            self, device, on_demand=self.builds_on_device(device) if on_demand is None else on_demand
        )

    def builds_on_device(self, device) -> bool:
        """True when every tensor this source reads is already on `device` (validate/resident.py), so building
        a layer costs device arithmetic only, no host -> device copy."""
        return False


class _EmbedProbe(nn.Module):
    """Stands in for embed_tokens: code that asks for its weight's dtype and device (Decoder.rope_and_mask,
    greedy decoding) gets float32 on the device."""

    def __init__(self, device):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1, device=device), requires_grad=False)


class _LayersOnDemand:
    """`model.layers` of a decoder built on demand: iterating builds each layer from its source (as the walk
    does, same arithmetic) and drops it after use, so decoding holds one layer's fp32 weights at a time."""

    def __init__(self, source: LayerSource, device):
        self.source, self.device = source, device

    def __len__(self) -> int:
        return self.source.config.num_layers

    def __iter__(self):
        for i in range(len(self)):
            yield self.source.layer(i, self.device, {})


class BuiltDecoder(Decoder):
    """A LayerSource's whole model as a Decoder (same forward, KV cache and attributes), float32 on the device.
    on_demand: layers are built at each forward instead of held (sources whose tensors are device-resident)."""

    def __init__(self, source: LayerSource, device, on_demand: bool = False):
        nn.Module.__init__(self)
        self.cfg, self._source = source.config, source
        self.model = nn.Module()
        if on_demand:
            self.model.layers = _LayersOnDemand(source, device)
        else:
            layers = nn.ModuleList()
            for i in range(self.cfg.num_layers):
                shared: Shared = {}
                layers.append(source.layer(i, device, shared))
            self.model.layers = layers
        self._shared: Shared = {}  # the embedding and head tensors, kept for every decoding step
        self._head = source.head(device, self._shared)
        self.model.norm = self._head.norm
        self.model.embed_tokens = _EmbedProbe(device)
        self.lm_head = None
        self.rotary = Rotary(self.cfg).to(device)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self._source.embed(input_ids, self._shared)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self._head(h)

    def layer_at(self, i: int, shared: Shared) -> nn.Module:
        """Layer i: held, or built now on demand from `shared` (greedy.joint_greedy_batch builds layer i of
        several decoders from one dict, as the walk does)."""
        layers = self.model.layers
        if isinstance(layers, _LayersOnDemand):
            return layers.source.layer(i, layers.device, shared)
        return layers[i]


def _resident(plan, device) -> bool:
    """The plan's base is served from `device` (validate/resident.py ResidentStore, its adapters moved there)."""
    resident_on = getattr(plan.base.store, "resident_on", None)
    return resident_on is not None and resident_on(device)


def _shared_get(shared: Shared, key, make: Callable[[], torch.Tensor]) -> torch.Tensor:
    if key not in shared:
        shared[key] = make()
    return shared[key]


class StoreSource(LayerSource):
    """A checkpoint's tensors as stored (any WeightStore-like `get(name)`), moved to the device."""

    def __init__(self, name: str, config: ModelConfig, store, key: str | None = None, getter=None):
        """getter(name, device): how to read a tensor onto the device (default: store.get, then moved)."""
        self.name, self.config, self.store = name, config, store
        self._key = key or f"store:{id(store)}"  # stages reading the same store share one read per layer
        self._get = getter or (lambda n, device: to_device(store.get(n), device))

    def tensor(self, name: str, device, shared: Shared) -> torch.Tensor:
        return _shared_get(shared, (self._key, name), lambda: self._get(name, device))


class MergedSource(LayerSource):
    """The merge of plan (base + adapters) computed on the device. `round_to` (a dtype, or "base": each tensor's
    base dtype) rounds it as MergedStore does: merged-bf16 of a build that merges on read, without a CPU merge."""

    def __init__(self, name: str, plan, base_key: str, round_to: torch.dtype | str | None = None):
        from dataclasses import replace

        self.name, self.plan, self.round_to, self._base_key = name, plan, round_to, base_key
        self.config = replace(plan.base.config, tie_word_embeddings=plan.tie_word_embeddings)

    def builds_on_device(self, device) -> bool:
        return _resident(self.plan, device)

    def tensor(self, name: str, device, shared: Shared) -> torch.Tensor:
        from lorafast_export.merge.stream import base_source_name, merge_onto

        src = base_source_name(self.plan, name)
        base = _shared_get(
            shared, (self._base_key, src), lambda: to_device(self.plan.base.store.get(src), device)
        )
        merged = _shared_get(shared, ("merged", name), lambda: merge_onto(self.plan, name, base))
        if self.round_to is None:
            return merged
        # "base": each tensor rounded to its base tensor's dtype, as merge/stream.py writes it without a dtype
        return merged.to(base.dtype if self.round_to == "base" else self.round_to)


class UnmergedLinear(nn.Module):
    """A base linear with LoRA/DoRA adapters applied unmerged, as peft's lora.Linear.forward in eval mode.

    adapters: [(A [r, in], B [out, r], scaling, DoRA magnitude [out] or None, weight)], applied in order; a
    weight != 1 scales lora_B (how the PEFT reference weights adapters; refused for DoRA by the caller)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, adapters: list):
        super().__init__()
        self.weight, self.bias = weight, bias
        self.adapters = []
        for a, b, s, mag, wt in adapters:
            b = b * wt
            norm_scale = None
            if mag is not None:  # peft DoraLinearLayer: ||W + s·B A|| per output row, detached, in x's dtype
                w_norm = torch.linalg.norm(weight.double() + s * (b.double() @ a.double()), dim=1)
                norm_scale = (mag.double() / w_norm).float()
            self.adapters.append((a, b, s, norm_scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = linear(x, self.weight, self.bias)
        for a, b, s, norm_scale in self.adapters:
            lora = linear(linear(x, a), b)
            if norm_scale is None:
                result = result + lora * s
            else:  # (m/||W'|| - 1) · (result without bias) + m/||W'|| · s · B A x   (peft dora.py forward)
                base = result if self.bias is None else result - self.bias
                result = result + (norm_scale - 1) * base + norm_scale * lora * s
        return result


class UnmergedSource(LayerSource):
    """The reference: the base with every adapter applied unmerged (see the module docstring)."""

    name = "reference"

    def __init__(self, plan, base_key: str):
        self.plan, self._base_key = plan, base_key
        self.config = plan.base.config

    def builds_on_device(self, device) -> bool:
        return _resident(self.plan, device)

    def _base(self, name: str, device, shared: Shared) -> torch.Tensor:
        return _shared_get(
            shared, (self._base_key, name), lambda: to_device(self.plan.base.store.get(name), device)
        )

    def tensor(self, name: str, device, shared: Shared) -> torch.Tensor:
        for ad in reversed(self.plan.adapters):  # modules_to_save: the trained copy replaces the module
            if name in ad.replacements:
                return ad.replacements[name].to(device)
        return self._base(name, device, shared)

    def _modules(self, path: str) -> list:
        return [(ad, ad.modules[path]) for ad in self.plan.adapters if path in ad.modules]

    def linear(self, path: str, device, shared: Shared) -> nn.Module | None:
        mods = self._modules(path)
        if not mods:
            return None
        if path == "lm_head" and LM_HEAD not in self.plan.base.store:
            wname = EMBED  # a tied head: PEFT's lm_head LoRA wraps the (untouched) embedding weight
        else:
            wname = path + ".weight"
        w = self.tensor(wname, device, shared).float()
        bname = path + ".bias"
        bias = self.tensor(bname, device, shared).float() if bname in self.plan.base.store else None
        adapters = [
            (
                m.a.to(device),
                m.b.to(device),
                m.scaling,
                None if m.magnitude is None else m.magnitude.to(device),
                ad.weight,
            )
            for ad, m in mods
        ]
        return UnmergedLinear(w, bias, adapters)

    def embed(self, ids: torch.Tensor, shared: Shared) -> torch.Tensor:
        h = F.embedding(ids, self.tensor(EMBED, ids.device, shared).float())
        for ad, m in self._modules("model.embed_tokens"):  # peft lora.Embedding: E[ids] + s · A^T[ids] B^T
            a, b = m.a.to(ids.device), m.b.to(ids.device) * ad.weight
            h = h + F.embedding(ids, a.T) @ b.T * m.scaling
        return h

    def head(self, device, shared: Shared) -> Head:
        norm = RMSNorm(self.config.hidden_size, self.config.rms_norm_eps)
        norm.weight = nn.Parameter(self.tensor(FINAL_NORM, device, shared).float(), requires_grad=False)
        mod = self.linear("lm_head", device, shared)
        if mod is not None:
            return Head(norm, mod)
        if LM_HEAD in self.plan.base.store or any(LM_HEAD in ad.replacements for ad in self.plan.adapters):
            w = self.tensor(LM_HEAD, device, shared)
        else:  # tied: the head is the base embedding (a LoRA or modules_to_save on embed_tokens is not seen)
            w = self._base(EMBED, device, shared)
        return Head(norm, lambda h: linear(h, w.float()), w)


class _DequantLinear(nn.Module):
    """qform.QLinear with its codes dequantized once when the layer is built (not at every call)."""

    def __init__(self, qt, device):
        from lorafast_export.qform import dequantize

        super().__init__()
        self.act_quant = qt.act_quant
        self.weight = dequantize(
            dataclasses.replace(
                qt,
                codes=to_device(qt.codes, device),  # ~7 GB of uint8 codes at 8B: pinned staging on a GPU
                scales=to_device(qt.scales, device),
                zeros=None if qt.zeros is None else to_device(qt.zeros, device),
                g_idx=None if qt.g_idx is None else to_device(qt.g_idx, device),
            )
        ).float()
        self.bias = None if qt.bias is None else qt.bias.to(device).float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from lorafast_export.qform import ACT_QUANT_INT8_PER_TOKEN, fake_quant_int8_per_token

        if self.act_quant == ACT_QUANT_INT8_PER_TOKEN:
            x = fake_quant_int8_per_token(x)
        return linear(x, self.weight, self.bias)


class QuantizedSource(LayerSource):
    """A QuantizedModel (in memory or lazy on disk): fp tensors from qm.fp, every qm.q linear dequantized."""

    def __init__(self, name: str, qm, merged: LayerSource | None = None):
        """merged: the merged model the codes were made from; each quantized linear's relative weight error
        against it is recorded in `layer_errors` as the layer is built (the report's per-layer table)."""
        self.name, self.qm, self.merged = name, qm, merged
        cfg = qm.config
        if "lm_head" in qm.q and cfg.tie_word_embeddings:  # fake_quant_decoder unties a quantized tied head
            cfg = dataclasses.replace(cfg, tie_word_embeddings=False)
        self.config = cfg
        self.layer_errors: dict[str, dict] = {}

    def tensor(self, name: str, device, shared: Shared) -> torch.Tensor:
        # memoized like the other sources' reads: a built decoder embeds through `shared` at every decoding step
        # (re-reading the 1 GB embedding of an 8B model per token made its greedy check 0.8 s per token)
        return _shared_get(shared, (f"fp:{id(self.qm)}", name), lambda: to_device(self.qm.fp[name], device))

    def linear(self, path: str, device, shared: Shared) -> nn.Module | None:
        if path not in self.qm.q:
            return None
        qt = self.qm.q[path]
        lin = _DequantLinear(qt, device)
        if self.merged is not None and path not in self.layer_errors:
            self.layer_errors[path] = _weight_error(
                path, lin.weight, qt, self.merged.tensor(path + ".weight", device, shared)
            )
        return lin


def _weight_error(path: str, dequantized: torch.Tensor, qt, merged: torch.Tensor) -> dict:
    """||dequantize(q) - W|| / ||W|| with W the merged weight (times a folded AWQ/SmoothQuant input scale: the
    codes are in that basis)."""
    import re

    w = merged.float()
    if qt.input_scale is not None:
        w = w * qt.input_scale.to(w.device).float()[None, :]
    err = float((dequantized - w).norm() / w.norm().clamp_min(1e-12))
    m = re.search(r"layers\.(\d+)\.", path)
    return {"module": path, "layer": int(m.group(1)) if m else None, "rel_error": err}


class DecoderSource(LayerSource):
    """An already built whole Decoder (fake-quant, damaged copies in tests, small models)."""

    def __init__(self, name: str, dec: Decoder):
        self.name, self.dec, self.config = name, dec.eval(), dec.cfg

    def embed(self, ids: torch.Tensor, shared: Shared) -> torch.Tensor:
        return self.dec.embed(ids.to(self.dec.head_weight().device)).float().to(ids.device)

    def layer(self, i: int, device, shared: Shared) -> nn.Module:
        lay = self.dec.model.layers[i]
        return lay if _device_of(lay) == torch.device(device) else _copy_to(lay, device)

    def head(self, device, shared: Shared) -> Head:
        norm = self.dec.model.norm
        norm = norm if norm.weight.device == torch.device(device) else _copy_to(norm, device)
        lm = self.dec.lm_head
        if lm is None:
            w = self.dec.model.embed_tokens.weight.to(device)
            return Head(norm, lambda h: F.linear(h, w.float()))
        lm = lm if _device_of(lm) == torch.device(device) else _copy_to(lm, device)
        return Head(norm, lambda h: lm(h).float())

    def decoder(self, device) -> Decoder:
        return self.dec if _device_of(self.dec) == torch.device(device) else _copy_to(self.dec, device)


def _device_of(mod: nn.Module) -> torch.device:
    t = next(iter([*mod.parameters(), *mod.buffers()]), None)
    return torch.device("cpu") if t is None else t.device


def _copy_to(mod: nn.Module, device) -> nn.Module:
    import copy

    return copy.deepcopy(mod).to(device)


def stored_bytes(store) -> int:
    """Bytes of a checkpoint as stored (what re-reading all of it takes)."""
    return sum(store.dtype_of(k).itemsize * math.prod(store.shape_of(k)) for k in store.keys())


def fp32_bytes(config: ModelConfig, store) -> int:
    """Bytes of a checkpoint in float32 (what a whole fp32 copy of it takes)."""
    return sum(4 * math.prod(store.shape_of(k)) for k in store.keys())
