"""The reference: the base with its adapter(s) applied UNMERGED, through transformers + PEFT.

This is the model the user trained. It is computed in fp32 on CPU by default (fp16/bf16 selectable on GPU),
and its logits are cached on disk by content hash, so a pipeline building several targets computes it once.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch

from lorafast_export.adapters import Adapter
from lorafast_export.errors import UnsupportedError
from lorafast_export.stagecache import cache_root
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
        return self.model(input_ids=ids.to(self.device)).logits.float().cpu()

    @torch.no_grad()
    def base_logits(self, ids: torch.Tensor) -> torch.Tensor:
        with self.model.disable_adapter():
            return self.model(input_ids=ids.to(self.device)).logits.float().cpu()

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


class ReferenceCache:
    """Reference logits per (inputs, eval set) on disk as safetensors, one file per eval set and kind."""

    def __init__(self, input_hashes: list[str], settings: dict):
        h = hashlib.sha256(json.dumps({"inputs": sorted(input_hashes), **settings}, sort_keys=True).encode())
        self.dir = cache_root() / "reference" / h.hexdigest()[:24]

    def path(self, kind: str, eval_digest: str) -> Path:
        return self.dir / f"{kind}-{eval_digest[:16]}.safetensors"

    def load(self, kind: str, eval_digest: str) -> list[torch.Tensor] | None:
        from safetensors.torch import load_file

        p = self.path(kind, eval_digest)
        if not p.exists():
            return None
        try:
            d = load_file(str(p))
        except Exception as e:  # noqa: BLE001 - a damaged cache entry is recomputed, not fatal
            log.warning("reference cache %s unreadable (%s); recomputing", p, e)
            return None
        return [d[f"b{i}"] for i in range(len(d))]

    def save(self, kind: str, eval_digest: str, blocks: list[torch.Tensor]) -> None:
        from safetensors.torch import save_file

        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.path(kind, eval_digest).with_suffix(".tmp")
        save_file({f"b{i}": b.contiguous() for i, b in enumerate(blocks)}, str(tmp))
        tmp.rename(self.path(kind, eval_digest))
