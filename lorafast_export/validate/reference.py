"""The reference: the base with its adapter(s) applied UNMERGED, through transformers + PEFT.

This is the model the user trained. It is computed in fp32 on CPU by default (fp16/bf16 selectable on GPU),
and its logits are cached on disk by content hash, so a pipeline building several targets computes it once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import torch

from lorafast_export.adapters import Adapter
from lorafast_export.errors import UnsupportedError
from lorafast_export.stagecache import cache_root
from lorafast_export.validate.resident import read_to_device, to_host
from lorafast_export.weights import ModelDir

log = logging.getLogger(__name__)


class Reference:
    """Unmerged PEFT model. `logits(ids)` with adapters; `base_logits(ids)` with adapters disabled."""

    def __init__(self, base: ModelDir, adapters: list[Adapter], device: str = "cpu", dtype=torch.float32):
        import peft
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(base.path, dtype=dtype)
        names = []
        for i, ad in enumerate(adapters):
            name = f"a{i}"
            if i == 0:
                model = peft.PeftModel.from_pretrained(model, ad.path, adapter_name=name)
            else:
                model.load_adapter(ad.path, adapter_name=name)
            names.append(name)
            if ad.weight != 1.0:
                if ad.use_dora:
                    raise UnsupportedError(
                        f"{ad.path}: a weighted DoRA adapter has no PEFT reference to validate "
                        "against; use weight 1 or --no-validate."
                    )
                with torch.no_grad():  # scaling lora_B by the weight is exactly a weighted LoRA
                    for n, p in model.named_parameters():
                        if f"lora_B.{name}" in n or f"lora_embedding_B.{name}" in n:
                            p.mul_(ad.weight)
        if len(names) > 1:
            model.base_model.set_adapter(names)
        self.model = model.to(device).eval()
        self.device = device

    @torch.no_grad()
    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        from lorafast_export.validate.layers import OneDnnLinears

        with OneDnnLinears():  # float32 linears through oneDNN on a CPU (layers.linear); nothing else changes
            return self.model(input_ids=ids.to(self.device)).logits.float().cpu()

    @torch.no_grad()
    def base_logits(self, ids: torch.Tensor) -> torch.Tensor:
        with self.model.disable_adapter():
            return self.logits(ids)

    @torch.no_grad()
    def generate(self, prompt: list[int], max_new_tokens: int) -> list[int]:
        ids = torch.tensor([prompt], device=self.device)
        out = self.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
        return out[0, len(prompt) :].tolist()


# Up to this size an eval set's reference logits are cached exactly (float32 logits, what the metrics read
# directly); beyond it, as 16-bit log-probs (ReferenceWriter). 256 MiB is 8,192 tokens at a 8k vocabulary, or
# 2,048 tokens at 32k: the bundled demo and small --max-tokens budgets stay exact.
EXACT_CACHE_BYTES = 256 << 20
CACHE_FORMAT = 2


class ReferenceCache:
    """Reference results per (inputs, eval set, kind) on disk, one directory each, written block by block and
    read back block by block (positional file I/O): never held in memory as a whole.

    kind "ref": per token the label's log-prob (float64), the argmax (int32), and the distribution:
      - exact: the float32 logits, when tokens x vocab x 4 bytes <= EXACT_CACHE_BYTES;
      - compact: float16 of (log p + H), H the token's entropy. The shift centres the tokens that carry the
        probability mass near 0, where float16 is finest (log-softmax, which the metrics apply, ignores it); the
        KL error this adds is bounded in tests/validate/test_cache.py and measured in bench/VALIDATION.md.
    kind "base": the label log-probs only (all that the bare base's perplexity needs).
    """

    def __init__(self, input_hashes: list[str], settings: dict):
        key = {"inputs": sorted(input_hashes), "format": CACHE_FORMAT, **settings}
        h = hashlib.sha256(json.dumps(key, sort_keys=True).encode())
        self.dir = cache_root() / "reference" / h.hexdigest()[:24]

    def path(self, kind: str, eval_digest: str) -> Path:
        return self.dir / f"{kind}-{eval_digest[:16]}"

    def open(self, kind: str, eval_digest: str, tokens: int) -> CachedReference | None:
        p = self.path(kind, eval_digest)
        if not (p / "meta.json").exists():
            return None
        try:
            entry = CachedReference(p)
        except Exception as e:  # noqa: BLE001 - a damaged cache entry is recomputed, not fatal
            log.warning("reference cache %s unreadable (%s); recomputing", p, e)
            return None
        if entry.tokens != tokens:
            log.warning("reference cache %s has %d tokens, expected %d; recomputing", p, entry.tokens, tokens)
            return None
        return entry

    def writer(self, kind: str, eval_digest: str, tokens: int, vocab: int) -> ReferenceWriter:
        full = kind == "ref"
        exact = tokens * vocab * 4 <= EXACT_CACHE_BYTES
        return ReferenceWriter(self.path(kind, eval_digest), tokens, vocab if full else 0, exact)


class ReferenceWriter:
    """Writes one cache entry row block by row block into a temporary directory; `finish` renames it into place
    (meta.json last), so an interrupted run leaves no entry that looks complete. Plain positional file writes,
    not memory maps: the pages written do not count toward the process's resident memory."""

    def __init__(self, final: Path, tokens: int, vocab: int, exact: bool):
        import os

        self.final, self.tokens, self.vocab, self.exact = final, tokens, vocab, exact
        self.tmp = final.with_name(f"{final.name}.tmp{os.getpid()}")
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir(parents=True)
        self.files = {
            name: open(self.tmp / f"{name}.bin", "wb") for name in _ARRAYS if name != "logits" or vocab
        }
        self.logits_dtype = np.float32 if exact else np.float16

    def _write(self, name: str, row: int, values: np.ndarray) -> None:
        f = self.files[name]
        f.seek(row * values[0].nbytes)
        f.write(np.ascontiguousarray(values).reshape(-1).view(np.uint8))  # no copy of a contiguous array

    @torch.no_grad()
    def put(self, row: int, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Rows [row, row + n) from logits [n, V] (any device) and their labels [n]."""
        logp = torch.log_softmax(logits.double(), dim=-1)
        label = logp.gather(-1, labels.to(logp.device).long()[:, None])[:, 0]
        self._write("label_logp", row, label.cpu().numpy().astype(np.float64))
        self._write("argmax", row, logp.argmax(-1).cpu().numpy().astype(np.int32))
        if "logits" not in self.files:
            return
        if self.exact:
            stored = logits.float()
        else:
            entropy = -(logp.exp() * torch.nan_to_num(logp, neginf=0.0)).sum(-1, keepdim=True)
            stored = (logp + entropy).clamp(-6.0e4, 6.0e4).to(torch.float16)
        self._write("logits", row, to_host(stored))  # from a GPU through its pinned staging buffer

    def finish(self) -> CachedReference:
        for f in self.files.values():
            f.close()
        meta = {"tokens": self.tokens, "vocab": self.vocab, "exact": self.exact}
        (self.tmp / "meta.json").write_text(json.dumps(meta))
        if self.final.exists():  # another process finished the same entry first: identical content
            shutil.rmtree(self.final, ignore_errors=True)
        self.tmp.rename(self.final)
        return CachedReference(self.final)

    def abort(self) -> None:
        for f in self.files.values():
            f.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


_ARRAYS = ("label_logp", "argmax", "logits")
TORCH_OF = {"float16": torch.float16, "float32": torch.float32}  # the cached logits' dtypes


class CachedReference:
    """One finished cache entry, read row block by row block with positional reads."""

    def __init__(self, path: Path):
        meta = json.loads((path / "meta.json").read_text())
        self.path = path
        self.tokens, self.vocab, self.exact = int(meta["tokens"]), int(meta["vocab"]), bool(meta["exact"])
        self.dtypes = {
            "label_logp": np.float64,
            "argmax": np.int32,
            "logits": np.float32 if self.exact else np.float16,
        }
        self.widths = {"label_logp": 1, "argmax": 1, "logits": self.vocab}
        for name in _ARRAYS if self.vocab else _ARRAYS[:2]:
            want = self.tokens * self.widths[name] * np.dtype(self.dtypes[name]).itemsize
            if (path / f"{name}.bin").stat().st_size != want:
                raise ValueError(f"{name}.bin does not have the size meta.json implies")

    @property
    def logits_dtype(self):
        return self.dtypes["logits"]

    def _read(self, name: str, row: int, n: int) -> np.ndarray:
        dt, w = np.dtype(self.dtypes[name]), self.widths[name]
        buf = bytearray(n * w * dt.itemsize)  # writable: torch.from_numpy shares it without a copy
        with open(self.path / f"{name}.bin", "rb") as f:
            f.seek(row * w * dt.itemsize)
            f.readinto(buf)
        a = np.frombuffer(buf, dtype=dt)
        return a.reshape(n, w) if w > 1 else a

    def rows(self, row: int, n: int, device="cpu") -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """(logits-like [n, V] float32 or None, label log-prob [n] float64, argmax [n] int64) for rows
        [row, row + n); the first goes through log-softmax in the metrics, so its per-row shift is irrelevant."""
        label = torch.from_numpy(self._read("label_logp", row, n)).to(device)
        argmax = torch.from_numpy(self._read("argmax", row, n).astype(np.int64)).to(device)
        if not self.vocab:
            return None, label, argmax
        # float16 -> float32 on the device (exact): half the bytes moved, no conversion on the host; the file
        # read goes straight into a GPU's pinned staging buffer (validate/resident.py)
        dt = np.dtype(self.dtypes["logits"])
        nbytes = n * self.vocab * dt.itemsize
        offset = row * self.vocab * dt.itemsize
        raw = read_to_device(self.path / "logits.bin", offset, nbytes, device, "a cache entry")
        return raw.view(TORCH_OF[dt.name]).reshape(n, self.vocab).float(), label, argmax
