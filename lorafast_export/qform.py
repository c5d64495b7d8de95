"""The one quantized form (IR) of a linear weight, its exact dequantization and a fake-quant module.

Conventions (every quantizer makes this, every target and checkpoint packer reads it):

- `codes` are UNSIGNED integers in [0, 2**bits), uint8, unpacked, shape [out, in], in the ORIGINAL
  input-column order (also under act-order).
- Dequantization is always  w[o, c] = (codes[o, c] - zero[o, g(c)]) * scales[o, g(c)].
- `zeros` holds unsigned integer zero points [out, n_groups] (uint8, in [0, 2**bits)) for asymmetric
  quantization. `zeros=None` means symmetric: the zero point is implicitly 2**(bits-1), i.e. the
  signed value is codes - 2**(bits-1) (GPTQ sym, compressed-tensors' offset, ONNX MatMulNBits'
  default zero point and OpenVINO u4 with zp=8 all use this same offset). The signed values span the
  full range [-2**(bits-1), 2**(bits-1) - 1] (int4: -8..7).
- Symmetric `scales` may be NEGATIVE: quant/rtn.py's signed grid maps each group's extreme, with its
  sign, onto -2**(bits-1). Every packer copies scales as they are, sign included; asymmetric scales
  are positive.
- Groups: g(c) = g_idx[c] when `g_idx` is set (act-order), else c // group_size
  (group_size=-1: one group per row, "per channel"). `g_idx` is GPTQ's g_idx exactly: int32 [in],
  the group of each input column in original order; with act-order the columns of one group are not
  contiguous. A kernel that wants contiguous groups permutes the columns by `act_order_perm(qt)`
  (stable argsort of g_idx) and the activations likewise.
- `input_scale` [in] is bookkeeping only: the AWQ/SmoothQuant smoothing factor that was already FOLDED
  into the preceding op, so this linear consumes already-scaled input. Never apply it again.
- `act_quant`: None (weight-only) or "int8_per_token_dynamic" (SmoothQuant W8A8: activations are
  quantized per token, symmetric int8, scale = absmax/127, at run time).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lorafast_export.errors import InputError

ACT_QUANT_INT8_PER_TOKEN = "int8_per_token_dynamic"
ACT_QUANTS = (None, ACT_QUANT_INT8_PER_TOKEN)
SUPPORTED_BITS = (4, 8)
SCALE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

QFORM_FORMAT = "lorafast-qform"
QFORM_VERSION = 1
_METADATA_KEY = "lorafast_qform"


@dataclass(frozen=True)
class QScheme:
    """What a quantized linear is, without its tensors: what checkpoint configs are built from."""

    bits: int
    group_size: int
    symmetric: bool
    act_order: bool = False
    act_quant: str | None = None

    def __post_init__(self) -> None:
        _check_bits_group(self.bits, self.group_size, where="QScheme")
        if self.act_quant not in ACT_QUANTS:
            raise InputError(f"QScheme.act_quant={self.act_quant!r}: use one of {ACT_QUANTS}.")


@dataclass(frozen=True, eq=False)
class QTensor:
    """One quantized linear weight of logical shape [out_features, in_features] (conventions: module doc)."""

    codes: torch.Tensor  # [out, in] uint8, unsigned codes
    scales: torch.Tensor  # [out, n_groups] float32 / float16 / bfloat16
    bits: int
    group_size: int  # -1 = per output channel
    zeros: torch.Tensor | None = None  # [out, n_groups] uint8; None = symmetric (zero 2**(bits-1))
    g_idx: torch.Tensor | None = None  # [in] int32, group of each input column (act-order)
    bias: torch.Tensor | None = None  # [out]
    input_scale: torch.Tensor | None = None  # [in], already folded into the previous op
    act_quant: str | None = None

    def __post_init__(self) -> None:
        _check_bits_group(self.bits, self.group_size, where="QTensor")
        problems = _qtensor_problems(self)
        if problems:
            raise InputError("invalid QTensor:\n  - " + "\n  - ".join(problems))

    @property
    def out_features(self) -> int:
        return self.codes.shape[0]

    @property
    def in_features(self) -> int:
        return self.codes.shape[1]

    @property
    def n_groups(self) -> int:
        return n_groups_for(self.in_features, self.group_size)

    @property
    def symmetric(self) -> bool:
        return self.zeros is None

    @property
    def scheme(self) -> QScheme:
        return QScheme(self.bits, self.group_size, self.symmetric, self.g_idx is not None, self.act_quant)


def n_groups_for(in_features: int, group_size: int) -> int:
    return 1 if group_size == -1 else math.ceil(in_features / group_size)


def _check_bits_group(bits: int, group_size: int, where: str) -> None:
    if bits not in SUPPORTED_BITS:
        raise InputError(f"{where}.bits={bits}: use one of {SUPPORTED_BITS}.")
    if group_size != -1 and group_size <= 0:
        raise InputError(f"{where}.group_size={group_size}: use -1 (per channel) or a positive group size.")


def _qtensor_problems(qt: QTensor) -> list[str]:
    """Every inconsistency at once; cheap checks on shapes/dtypes plus one pass over the codes."""
    p: list[str] = []
    if qt.codes.dtype != torch.uint8 or qt.codes.dim() != 2:
        return [f"codes must be a 2-D uint8 tensor [out, in], got {qt.codes.dtype} {tuple(qt.codes.shape)}"]
    out, in_ = qt.codes.shape
    n_groups = n_groups_for(in_, qt.group_size)
    if qt.codes.numel() and int(qt.codes.max()) >= 2**qt.bits:
        p.append(f"codes hold values >= 2**bits={2**qt.bits}; re-quantize with bits={qt.bits}")
    if qt.scales.dtype not in SCALE_DTYPES or tuple(qt.scales.shape) != (out, n_groups):
        p.append(
            f"scales must be float [out={out}, n_groups={n_groups}], got {qt.scales.dtype} "
            f"{tuple(qt.scales.shape)}"
        )
    if qt.zeros is not None:
        if qt.zeros.dtype != torch.uint8 or tuple(qt.zeros.shape) != (out, n_groups):
            p.append(
                f"zeros must be uint8 [out={out}, n_groups={n_groups}] or None (symmetric), got "
                f"{qt.zeros.dtype} {tuple(qt.zeros.shape)}"
            )
        elif qt.zeros.numel() and int(qt.zeros.max()) >= 2**qt.bits:
            p.append(f"zeros hold values >= 2**bits={2**qt.bits}")
    if qt.g_idx is not None:
        if qt.g_idx.dtype != torch.int32 or tuple(qt.g_idx.shape) != (in_,):
            p.append(f"g_idx must be int32 [in={in_}], got {qt.g_idx.dtype} {tuple(qt.g_idx.shape)}")
        elif in_ and (int(qt.g_idx.min()) < 0 or int(qt.g_idx.max()) >= n_groups):
            p.append(f"g_idx values must lie in [0, n_groups={n_groups})")
    if qt.bias is not None and tuple(qt.bias.shape) != (out,):
        p.append(f"bias must be [out={out}], got {tuple(qt.bias.shape)}")
    if qt.input_scale is not None and tuple(qt.input_scale.shape) != (in_,):
        p.append(f"input_scale must be [in={in_}], got {tuple(qt.input_scale.shape)}")
    if qt.act_quant not in ACT_QUANTS:
        p.append(f"act_quant={qt.act_quant!r}: use one of {ACT_QUANTS}")
    return p


# ---------------------------------------------------------------------------------------------- math


def group_index(in_features: int, group_size: int, g_idx: torch.Tensor | None = None) -> torch.Tensor:
    """[in] int64: the group of each input column (g_idx if given, else c // group_size)."""
    if g_idx is not None:
        return g_idx.long()
    if group_size == -1:
        return torch.zeros(in_features, dtype=torch.long)
    return torch.arange(in_features) // group_size


def zero_points(qt: QTensor) -> torch.Tensor:
    """[out, n_groups] uint8: explicit zero points, materialising the symmetric 2**(bits-1)."""
    if qt.zeros is not None:
        return qt.zeros
    shape = (qt.out_features, qt.n_groups)
    return torch.full(shape, 2 ** (qt.bits - 1), dtype=torch.uint8, device=qt.codes.device)


def act_order_perm(qt: QTensor) -> torch.Tensor:
    """[in] int64: input columns sorted by group (stable), so groups become contiguous after w[:, perm]."""
    return torch.argsort(group_index(qt.in_features, qt.group_size, qt.g_idx), stable=True)


def dequantize(qt: QTensor) -> torch.Tensor:
    """[out, in] float32: (codes - zero) * scale, exact up to the one float32 multiply."""
    return dequantize_parts(qt.codes, qt.scales, qt.zeros, qt.bits, qt.group_size, qt.g_idx)


def dequantize_parts(
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bits: int,
    group_size: int,
    g_idx: torch.Tensor | None = None,
) -> torch.Tensor:
    """dequantize() on the raw fields (no validation): what QLinear.forward runs every call."""
    g = group_index(codes.shape[1], group_size, g_idx).to(codes.device)  # [in]
    s = scales[:, g].float()  # [out, in]
    z = 2.0 ** (bits - 1) if zeros is None else zeros[:, g].float()  # [out, in] or scalar
    return (codes.float() - z) * s


def concat_biases(biases: list[torch.Tensor | None], sizes: list[int]) -> torch.Tensor | None:
    """Biases of the parts (None = zeros) → one bias, or None when no part has one."""
    if all(b is None for b in biases):
        return None
    return torch.cat(
        [torch.zeros(n) if b is None else b.float().cpu() for b, n in zip(biases, sizes, strict=True)]
    )


def concat_qtensors(qts: list[QTensor], biases: list[torch.Tensor | None]) -> QTensor | None:
    """QTensors [out_i, in] of one scheme → one [sum out_i, in] (row concatenation keeps every code, scale
    and zero point, so the fused linear computes the parts side by side); None if schemes or act-order differ.
    `biases`: each part's bias held outside its QTensor (HF `*.bias` tensors), used where the part has none."""
    a = qts[0]
    same = all(q.scheme == a.scheme and q.in_features == a.in_features for q in qts) and all(
        (q.g_idx is None and a.g_idx is None)
        or (q.g_idx is not None and a.g_idx is not None and torch.equal(q.g_idx, a.g_idx))
        for q in qts
    )
    if not same:
        return None
    scales = [q.scales for q in qts]
    if any(s.dtype != scales[0].dtype for s in scales):
        scales = [s.float() for s in scales]  # fp16/bf16 → fp32 is exact
    sizes = [q.out_features for q in qts]
    parts = [q.bias if q.bias is not None else b for q, b in zip(qts, biases, strict=True)]
    return QTensor(
        codes=torch.cat([q.codes for q in qts]),
        scales=torch.cat(scales),
        zeros=None if a.zeros is None else torch.cat([q.zeros for q in qts]),
        bits=a.bits,
        group_size=a.group_size,
        g_idx=a.g_idx,
        bias=concat_biases(parts, sizes),
        act_quant=a.act_quant,
    )


def int8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., in] → (each token's symmetric int8 codes, -127..127, as float32 [..., in]; its float32 scale
    [..., 1] = absmax / 127). fake_quant_int8_per_token is codes * scale; the runtime's W8A8 linear
    multiplies the codes as int8."""
    xf = x.float()
    scale = (xf.abs().amax(dim=-1, keepdim=True) / 127.0).clamp(min=1e-8)  # [..., 1]
    return (xf / scale).round().clamp(-127, 127), scale


def fake_quant_int8_per_token(x: torch.Tensor) -> torch.Tensor:
    """x [..., in] → quantize-dequantize each token to symmetric int8 (scale = absmax / 127)."""
    codes, scale = int8_per_token(x)
    return (codes * scale).to(x.dtype)


class QLinear(torch.nn.Module):
    """Fake-quant reference of a QTensor: dequantize on the fly, then F.linear in the input's dtype."""

    def __init__(self, qt: QTensor) -> None:
        super().__init__()
        self.bits, self.group_size, self.act_quant = qt.bits, qt.group_size, qt.act_quant
        self.in_features, self.out_features = qt.in_features, qt.out_features
        for name in ("codes", "scales", "zeros", "g_idx", "bias", "input_scale"):
            self.register_buffer(name, getattr(qt, name))

    @classmethod
    def from_qtensor(cls, qt: QTensor) -> QLinear:
        return cls(qt)

    @property
    def qtensor(self) -> QTensor:
        return QTensor(
            codes=self.codes,
            scales=self.scales,
            bits=self.bits,
            group_size=self.group_size,
            zeros=self.zeros,
            g_idx=self.g_idx,
            bias=self.bias,
            input_scale=self.input_scale,
            act_quant=self.act_quant,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
        if self.act_quant == ACT_QUANT_INT8_PER_TOKEN:
            x = fake_quant_int8_per_token(x)
        w = dequantize_parts(self.codes, self.scales, self.zeros, self.bits, self.group_size, self.g_idx)
        w = w.to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, w, bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, act_quant={self.act_quant}"
        )


# ----------------------------------------------------------------------------- our safetensors layout
# {name}.qcodes   uint8  4-bit: two codes a byte along `in` (low nibble = even column), [out, ceil(in/2)]
#                        8-bit: [out, in]
# {name}.qscales  float  [out, n_groups]       {name}.qzeros  uint8 [out, n_groups]   (asymmetric only)
# {name}.g_idx    int32  [in]                  {name}.bias / {name}.input_scale
# Header metadata "lorafast_qform": JSON {format, version, tensors: {name: {bits, group_size, shape,
# symmetric, act_quant, codes_packing, parts}}}: what each tensor is, never guessed from its name.

_OPTIONAL_PARTS = {"qzeros": "zeros", "g_idx": "g_idx", "bias": "bias", "input_scale": "input_scale"}


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:  # [out, in] -> [out, ceil(in/2)]
    if codes.shape[1] % 2:
        codes = F.pad(codes, (0, 1))
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def _unpack_nibbles(packed: torch.Tensor, in_features: int) -> torch.Tensor:  # -> [out, in]
    out = torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(packed.shape[0], -1)
    return out[:, :in_features].contiguous()


def qtensors_to_state_dict(qtensors: dict[str, QTensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """{module: QTensor} → (safetensors tensors, header metadata); for writers that stream shards."""
    tensors: dict[str, torch.Tensor] = {}
    entries: dict[str, dict] = {}
    for name, qt in qtensors.items():
        packed = qt.bits == 4
        tensors[f"{name}.qcodes"] = pack_nibbles(qt.codes) if packed else qt.codes
        tensors[f"{name}.qscales"] = qt.scales
        parts = ["qcodes", "qscales"]
        for part, field in _OPTIONAL_PARTS.items():
            value = getattr(qt, field)
            if value is not None:
                tensors[f"{name}.{part}"] = value
                parts.append(part)
        entries[name] = {
            "bits": qt.bits,
            "group_size": qt.group_size,
            "shape": list(qt.codes.shape),
            "symmetric": qt.symmetric,
            "act_quant": qt.act_quant,
            "parts": parts,
            "codes_packing": "u4x2_low_first" if packed else "u8",
        }
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}  # files are written from CPU
    seen: set[int] = set()
    for k, v in tensors.items():  # safetensors refuses tensors that share memory (e.g. one g_idx for q/k/v)
        if v.numel() and v.untyped_storage().data_ptr() in seen:
            tensors[k] = v.clone()
        seen.add(tensors[k].untyped_storage().data_ptr())
    return tensors, qform_metadata(entries)


def qform_metadata(entries: dict[str, dict]) -> dict[str, str]:
    """The header metadata of a qform file holding these modules ({module: entry}, as qform_entries reads)."""
    return {_METADATA_KEY: json.dumps({"format": QFORM_FORMAT, "version": QFORM_VERSION, "tensors": entries})}


def qtensors_from_state_dict(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None, source: str = "state dict"
) -> dict[str, QTensor]:
    """Inverse of qtensors_to_state_dict; the metadata says what every tensor is."""
    entries = qform_entries(metadata, source)
    return {name: qtensor_from_entry(name, e, tensors.get, source) for name, e in entries.items()}


def qform_entries(metadata: dict[str, str] | None, source: str) -> dict[str, dict]:
    """{module: entry} from a file's header metadata (what each module's tensors are), checked."""
    if not metadata or _METADATA_KEY not in metadata:
        raise InputError(
            f"{source}: no '{_METADATA_KEY}' header metadata; it was not written by "
            "lorafast_export.qform.save_qtensors. Re-export it with lorafast-export."
        )
    meta = json.loads(metadata[_METADATA_KEY])
    if meta.get("format") != QFORM_FORMAT or meta.get("version") != QFORM_VERSION:
        raise InputError(
            f"{source}: qform format/version {meta.get('format')}/{meta.get('version')} is not "
            f"{QFORM_FORMAT}/{QFORM_VERSION}; re-export it with this lorafast-export version."
        )
    return meta["tensors"]


def qtensor_from_entry(name: str, e: dict, get, source: str) -> QTensor:
    """One module's QTensor from its metadata entry; get(key) returns a stored tensor or None."""
    parts = {p: get(f"{name}.{p}") for p in e["parts"]}
    missing = [f"{name}.{p}" for p, t in parts.items() if t is None]
    if missing:
        raise InputError(
            f"{source}: tensors {missing} listed in the metadata are missing; the file is "
            "incomplete, re-export it."
        )
    codes = parts["qcodes"]
    if e["codes_packing"] == "u4x2_low_first":
        codes = _unpack_nibbles(codes, e["shape"][1])
    optional = {f: parts[p] for p, f in _OPTIONAL_PARTS.items() if p in parts}
    return QTensor(
        codes=codes,
        scales=parts["qscales"],
        bits=e["bits"],
        group_size=e["group_size"],
        act_quant=e["act_quant"],
        **optional,
    )


def save_qtensors(
    path: str | Path, qtensors: dict[str, QTensor], extra_metadata: dict[str, str] | None = None
) -> None:
    """Write {module: QTensor} to one safetensors file in our layout (see the comment above)."""
    tensors, metadata = qtensors_to_state_dict(qtensors)
    save_file(tensors, str(path), metadata={**(extra_metadata or {}), **metadata})


def load_qtensors(path: str | Path) -> dict[str, QTensor]:
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    return qtensors_from_state_dict(load_file(str(path)), metadata, source=str(path))


def with_fields(qt: QTensor, **changes: object) -> QTensor:
    """A copy of qt with fields replaced (and validated again), e.g. with_fields(qt, input_scale=s)."""
    return replace(qt, **changes)


def pad_qtensor(qt: QTensor, out_features: int | None = None, in_features: int | None = None) -> QTensor:
    """qt grown to [out_features, in_features] with weights that dequantize to exactly 0: new codes equal their
    row's zero point (a ragged last group keeps its scale over its new columns; a new group or row gets scale 1
    and, asymmetric, zero point 2**(bits-1)); new bias entries 0, new input_scale entries 1. A runtime whose
    kernels need the group to divide in_features takes the padded weight with zero-padded activations (or
    rows padded to match: an MLP's extra gate/up outputs are 0 and silu(0) * 0 = 0)."""
    if qt.g_idx is not None:
        raise InputError("pad_qtensor: act-order (g_idx) weights have no contiguous last group to pad")
    rows = max(0, (out_features or qt.out_features) - qt.out_features)
    cols = max(0, (in_features or qt.in_features) - qt.in_features)
    n_groups = n_groups_for(qt.in_features + cols, qt.group_size)
    new_groups = n_groups - qt.n_groups
    mid = 2 ** (qt.bits - 1)

    def grow(
        t: torch.Tensor, fill_cols: torch.Tensor, fill_rows: int
    ) -> torch.Tensor:  # [out + rows, k + new]
        t = torch.cat([t, fill_cols.to(t.dtype)], dim=1)
        return torch.cat([t, torch.full((rows, t.shape[1]), fill_rows, dtype=t.dtype, device=t.device)])

    zeros = zero_points(qt)
    g_new = group_index(qt.in_features + cols, qt.group_size)[qt.in_features :].to(zeros.device)  # [cols]
    in_old = (g_new < qt.n_groups)[None, :]  # the ragged last group's new columns keep its zero point
    code_cols = torch.where(
        in_old, zeros[:, g_new.clamp(max=qt.n_groups - 1)], torch.full_like(zeros[:, :1], mid)
    )
    one = torch.ones((), dtype=qt.scales.dtype, device=qt.scales.device)
    return replace(
        qt,
        codes=grow(qt.codes, code_cols, mid),
        scales=grow(qt.scales, one.expand(qt.out_features, new_groups), 1),
        zeros=None
        if qt.zeros is None
        else grow(qt.zeros, zeros[:, :1].expand(-1, new_groups) * 0 + mid, mid),
        bias=None if qt.bias is None else torch.cat([qt.bias, qt.bias.new_zeros(rows)]),
        input_scale=None
        if qt.input_scale is None
        else torch.cat([qt.input_scale, qt.input_scale.new_ones(cols)]),
    )


def qtensor_to(qt: QTensor, device: torch.device | str) -> QTensor:
    """qt with every tensor moved to device (dtypes kept)."""
    moved = {f: getattr(qt, f) for f in ("codes", "scales", "zeros", "g_idx", "bias", "input_scale")}
    return replace(qt, **{f: None if t is None else t.to(device) for f, t in moved.items()})
