"""Time the torch runtime's model build from an int4 artifact's qform file (issue 13), current code against
the session-7 code (packing on the host), with the peak host RSS and GPU memory of each.

    PYTHONPATH=. python bench/runtime_load.py --device cuda --shape llama3-8b --old-layers 8 --out load.json
    PYTHONPATH=. python bench/runtime_load.py --device cpu --shape demo-like --kernel triton   # rehearsal

It writes a qform file (runtime/artifact.py's `qweights`) holding every linear of the shape as int4 g128
asymmetric with random codes, fp16 scales and zero points (the format GPTQ writes; the codes' values do not
change the load's work), and random bf16 norms/embeddings on the device. Then, as runtime/loader.py does:
- new: open_qtensors(file, device) + build_model (the loader's path on this commit);
- old: open_qtensors(file) on the host + build_model with the session-7 lowering (`legacy_lower` below:
  codes unpacked, permuted and repacked on the host, each packing copied to the device; tinygemm's codes
  copied as int32), over the first --old-layers layers (the whole model takes ~25 s that way on an H200),
  per layer scaled to the model; its buffers are compared with the new build's, bit for bit.
Also `fp_read`: the fp tensors (embedding, lm_head, norms) written as the artifact's weight file and read
onto the device by safetensors' load_file (session 7's read_weights) and by read_on_device (this commit's).
The page cache holds the files in both runs (written just before), as it does after an artifact's build.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lorafast_export.model.quantized import LazyQTensors, WeightStore, open_qtensors, read_on_device  # noqa: E402
from lorafast_export.model.spec import ModelConfig  # noqa: E402
from lorafast_export.qform import pack_nibbles, qform_metadata  # noqa: E402
from lorafast_export.runtime import linear, paged  # noqa: E402
from lorafast_export.runtime.tinygemm import INNER_K_TILES, pack_int4  # noqa: E402
from scripts.make_model import PRESETS, hf_config, tensor_shapes  # noqa: E402

GROUP = 128


def host_peak_reset() -> bool:
    """Reset the process's peak RSS (VmHWM; Linux >= 4.0); False where refused (the peak is then the
    process's since its start)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def host_peak_gb() -> float:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM"))
    return int(line.split()[1]) / 2**20


def write_artifact(path: Path, shapes: dict, gen: torch.device) -> int:
    """Every `*_proj.weight` of `shapes` as one qform file; returns the weights' count."""
    tensors, entries, n = {}, {}, 0
    g = torch.Generator(gen).manual_seed(0)
    for name, (out_f, in_f) in ((k, s) for k, s in shapes.items() if k.endswith("_proj.weight")):
        m, groups = name[: -len(".weight")], -(-in_f // GROUP)
        tensors[f"{m}.qcodes"] = torch.randint(
            0, 256, (out_f, in_f // 2), generator=g, device=gen, dtype=torch.uint8
        ).cpu()
        tensors[f"{m}.qscales"] = (
            (torch.rand(out_f, groups, generator=g, device=gen) * 1e-2 + 1e-3).half().cpu()
        )
        tensors[f"{m}.qzeros"] = torch.randint(
            0, 16, (out_f, groups), generator=g, device=gen, dtype=torch.uint8
        ).cpu()
        entries[m] = {
            "bits": 4, "group_size": GROUP, "shape": [out_f, in_f], "symmetric": False, "act_quant": None,
            "parts": ["qcodes", "qscales", "qzeros"], "codes_packing": "u4x2_low_first",
        }  # fmt: skip
        n += out_f * in_f
    save_file(tensors, str(path), metadata=qform_metadata(entries))
    return n


def fp_tensors(shapes: dict, dev: torch.device, layers: int) -> dict:
    keep = {k: s for k, s in shapes.items() if not k.endswith("_proj.weight") and _layer(k) < layers}
    return {k: torch.ones(s, dtype=torch.bfloat16, device=dev) for k, s in keep.items()}


def _layer(name: str) -> int:
    parts = name.split(".")
    return int(parts[2]) if parts[:2] == ["model", "layers"] else -1


# ------------------------------------------------------------------------- the session-7 lowering (baseline)
def _old_pack_int4_cuda(codes: torch.Tensor, device) -> torch.Tensor:
    if torch.device(device).type != "cuda":
        return pack_int4(codes, device)  # the CPU packing did not change
    c = codes.to(device=device, dtype=torch.int32)
    return torch.ops.aten._convert_weight_to_int4pack(
        (c[:, ::2] << 4 | c[:, 1::2]).to(torch.uint8), INNER_K_TILES
    )


def _old_tinygemm_pack(qt, codes, dtype, device):
    scales = qt.scales.float()
    zeros = (8.0 - qt.zeros.float()) * scales if qt.zeros is not None else torch.zeros_like(scales)
    sz = torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous()
    return _old_pack_int4_cuda(codes, device), sz.to(device=device, dtype=dtype)


def _old_pack_words(codes: torch.Tensor) -> torch.Tensor:
    from lorafast_export.runtime.triton_int4 import ROWS_PER_BLOCK as r
    from lorafast_export.runtime.triton_int4 import WORD_COLS as t

    out_f, in_f = codes.shape
    c = torch.nn.functional.pad(codes.to(torch.int32), (0, -in_f % t, 0, -out_f % r))
    c = c.view(c.shape[0] // r, r, c.shape[1] // t, 8, t // 8)
    w = sum(c[:, :, :, j] << (4 * j) for j in range(8))
    return w.permute(0, 2, 1, 3).contiguous().view(-1, c.shape[2] * (t // 8))


class LegacyInt4TritonLinear(linear.Int4TritonLinear):
    """Int4TritonLinear as session 7 built it: every packing made on the host, then copied."""

    def __init__(self, qt, bias=None, dtype=torch.bfloat16, device="cpu", plan=None):
        linear._QuantLinearBase.__init__(self, qt, bias, dtype, device)
        from lorafast_export.runtime import triton_int4 as t4

        perm = linear._contiguous_groups(qt)
        codes = (qt.codes if perm is None else qt.codes[:, perm]).to(torch.uint8)
        self.group_size, self.plan = qt.group_size, list(plan or linear.default_plan())
        if not linear.tinygemm_fits(qt, torch.device(device).type == "cuda", dtype):
            self.plan = linear._tinygemm_to_gemv(self.plan, t4)
        if qt.group_size % t4.WORD_COLS:
            self.plan = linear._words_to_tiled(self.plan, t4)
        kinds = set(self.plan[1 :: t4.ENTRY])
        pack = {
            "weight": (pack_nibbles, {t4.GEMV, t4.GEMM}),
            "weight_tiled": (lambda c: t4.pack_tiles(c, qt.group_size), {t4.GEMV_T, t4.GEMM_T}),
            "weight_words": (_old_pack_words, {t4.GEMM_W, t4.GEMV_W}),
        }
        for name, (fn, uses) in pack.items():
            self.register_buffer(name, fn(codes).to(device) if kinds & uses else None)
        entries = [self.plan[i : i + t4.ENTRY] for i in range(0, len(self.plan), t4.ENTRY)]
        sz = any(e[1] == t4.GEMM_W and e[3] & 32 for e in entries)
        sz = t4.pack_scale_zero(qt.scales, qt.zeros) if sz else None
        self.register_buffer("scale_zero_words", None if sz is None else sz.to(device))
        self.register_buffer("scales", qt.scales.to(device))
        self.register_buffer("zeros", None if qt.zeros is None else qt.zeros.to(device))
        self.register_buffer("perm", None if perm is None else perm.to(device))
        tg = _old_tinygemm_pack(qt, codes, dtype, device) if t4.TINYGEMM in kinds else (None, None)
        self.register_buffer("tinygemm_weight", tg[0])
        self.register_buffer("tinygemm_scale_zeros", tg[1])


def legacy_lower(qt, device, dtype, prefer="auto", bias=None):
    if linear.choose_kernel(qt, device, dtype, prefer) == "int4_triton":
        plan = linear.triton_plan(qt, device, dtype, prefer)
        return LegacyInt4TritonLinear(qt, bias=bias, dtype=dtype, device=device, plan=plan)
    return linear.lower_qtensor(qt, device, dtype, prefer, bias)


# ------------------------------------------------------------------------------------------------- runs
def build(cfg, fp, q, dev, kernel) -> tuple[object, dict]:
    sync = torch.cuda.synchronize if dev.type == "cuda" else lambda: None
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if dev.type == "cuda" else 0
    reset = host_peak_reset()
    sync()
    t = time.perf_counter()
    dec, kernels = paged.build_model(cfg, fp, q, dev, torch.bfloat16, kernel)
    sync()
    res = {
        "s": round(time.perf_counter() - t, 3),
        "host_peak_gb": round(host_peak_gb(), 2),
        "peak_reset": reset,
    }
    if dev.type == "cuda":
        res["gpu_peak_gb"] = round((torch.cuda.max_memory_allocated() - base) / 1e9, 2)
        res["gpu_held_gb"] = round((torch.cuda.memory_allocated() - base) / 1e9, 2)
    res["kernels"] = {k: sum(v == k for v in kernels.values()) for k in sorted(set(kernels.values()))}
    return dec, res


def int4_bytes(dec) -> dict:
    """GB of each int4 buffer kind over the model (what the codes cost on the device, layout by layout)."""
    out: dict[str, float] = {}
    for mod in dec.modules():
        if isinstance(mod, linear.Int4TritonLinear | linear.Int4Linear):
            for n, b in mod.named_buffers(recurse=False):
                if b is not None:
                    out[n] = out.get(n, 0.0) + b.numel() * b.element_size() / 1e9
    return {k: round(v, 3) for k, v in out.items()}


def fp_read(path: Path, shapes: dict, dev: torch.device, layers: int) -> dict:
    """The artifact's fp tensors (embedding, lm_head, norms) read onto the device: safetensors' load_file
    (session 7's read_weights) against read_on_device (this commit's), the same values."""
    fp = fp_tensors(shapes, dev, layers)
    save_file({k: torch.randn_like(v).cpu() for k, v in fp.items()}, str(path))
    del fp
    sync = torch.cuda.synchronize if dev.type == "cuda" else lambda: None
    out = {}

    def new_read():
        store = WeightStore([path])
        return {n: read_on_device(store, n, dev) for n in store.keys()}

    for label, read in (("old", lambda: load_file(str(path), device=str(dev))), ("new", new_read)):
        sync()
        t = time.perf_counter()
        got = read()
        sync()
        out[f"{label}_s"], out[label] = round(time.perf_counter() - t, 3), got
    out["gb"] = round(sum(t.numel() * t.element_size() for t in out["new"].values()) / 1e9, 2)
    out["equal"] = all(torch.equal(out["old"][k], t) for k, t in out["new"].items())
    del out["old"], out["new"]
    return out


def compare(old, new) -> dict:
    newb = dict(new.named_buffers())
    names = [n for n, _ in old.named_buffers() if n in newb]
    diff = [n for n, b in old.named_buffers() if n in newb and not torch.equal(b, newb[n])]
    return {"buffers": len(names), "differ": len(diff), "first_differ": diff[:5]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--shape", default="llama3-8b", choices=sorted(PRESETS))
    p.add_argument("--layers", type=int, default=0, help="0: the shape's")
    p.add_argument("--old-layers", type=int, default=8, help="layers built the session-7 way (0: skip)")
    p.add_argument("--kernel", default="auto", choices=linear.KERNELS)
    p.add_argument("--dir", default=None, help="where the qform file goes (default: a temporary folder)")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    dev = torch.device(a.device)
    hf = hf_config(PRESETS[a.shape])
    if a.layers:
        hf["num_hidden_layers"] = a.layers
    shapes, layers = tensor_shapes(hf), hf["num_hidden_layers"]
    cfg = ModelConfig.from_dict(hf)
    res: dict = {"shape": a.shape, "layers": layers, "device": str(dev), "kernel": a.kernel}
    if dev.type == "cuda":
        res["gpu"] = torch.cuda.get_device_name(dev)
    from lorafast_export.runtime import triton_int4  # noqa: F401  (imported before the clocks: both runs pay it)

    with torch.device("meta"):  # the meta init's first call imports torch._dynamo (~5-15 s): not the load's
        torch.nn.Embedding(2, 2)

    with tempfile.TemporaryDirectory(dir=a.dir) as tmp:
        path = Path(tmp) / "qweights.safetensors"
        t = time.perf_counter()
        res["weights"] = write_artifact(path, shapes, dev)
        res["write_s"] = round(time.perf_counter() - t, 2)
        entries = open_qtensors([path]).entries

        def first(n: int, device=None):  # (config, fp tensors, lazy QTensors) of the first n layers
            q = LazyQTensors(WeightStore([path]), {m: e for m, e in entries.items() if _layer(m) < n}, device)
            return ModelConfig.from_dict({**hf, "num_hidden_layers": n}), fp_tensors(shapes, dev, n), q

        build(*first(1, dev), dev, a.kernel)  # warm-up (first calls of the device's ops), not counted
        new, res["new"] = build(
            cfg, fp_tensors(shapes, dev, layers), open_qtensors([path], dev), dev, a.kernel
        )
        res["new"]["int4_gb"] = int4_bytes(new)
        print(json.dumps(res), flush=True)
        res["fp_read"] = fp_read(Path(tmp) / "weights.safetensors", shapes, dev, layers)
        print(json.dumps(res), flush=True)
        if a.old_layers:
            n = min(a.old_layers, layers)
            paged.lower_qtensor, keep = legacy_lower, paged.lower_qtensor
            try:
                old, res["old"] = build(*first(n), dev, a.kernel)
            finally:
                paged.lower_qtensor = keep
            res["old"]["layers"] = n
            res["old"]["s_scaled_to_model"] = round(res["old"]["s"] * layers / n, 2)
            res["old_vs_new_bits"] = compare(old, new)
    print(json.dumps(res), flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
