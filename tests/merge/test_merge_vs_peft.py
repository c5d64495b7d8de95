"""The merged checkpoint, loaded by transformers, computes what PEFT's unmerged model computes."""

import copy

import peft
import pytest
import torch
import transformers

from lorafast_export.adapters import open_adapter
from lorafast_export.merge import merge
from lorafast_export.weights import open_model
from tests.tiny import hf_logits, make_model, save_model

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapter(base_model, path, seed=1, magnitude_noise=True, **lora_kw):
    torch.manual_seed(seed)
    cfg = peft.LoraConfig(init_lora_weights=False, **{"r": 4, "lora_alpha": 8, **lora_kw})
    pm = peft.get_peft_model(copy.deepcopy(base_model), cfg)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n or "lora_embedding_B" in n:
                p.normal_(0, 0.3)
            if "lora_magnitude_vector" in n and magnitude_noise:
                p.mul_(1 + 0.2 * torch.randn_like(p))
            if "modules_to_save" in n:
                p.add_(0.1 * torch.randn_like(p))
    pm.save_pretrained(path)
    return pm.eval()


CASES = {
    "lora-qv": ("llama", {}, dict(target_modules=["q_proj", "v_proj"])),
    "lora-all": ("llama", {}, dict(target_modules=ALL)),
    "rslora": ("llama", {}, dict(target_modules=ALL, use_rslora=True, r=8, lora_alpha=4)),
    "patterns": (
        "llama",
        {},
        dict(
            target_modules=ALL,
            rank_pattern={"q_proj": 2, r"layers\.1\.mlp\.down_proj": 6},
            alpha_pattern={"v_proj": 3, "o_proj": 20},
        ),
    ),
    "regex-targets": (
        "llama",
        {},
        dict(target_modules=r".*\.layers\.[01]\.(self_attn\.(q|k)_proj|mlp\.up_proj)"),
    ),
    "layers-to-transform": ("llama", {"layers": 3}, dict(target_modules=ALL, layers_to_transform=[0, 2])),
    "dora": ("llama", {}, dict(target_modules=ALL, use_dora=True)),
    "dora-mistral": ("mistral", {}, dict(target_modules=ALL, use_dora=True)),
    "qwen2-bias": ("qwen2", {}, dict(target_modules=ALL)),
    "qwen2-dora": (
        "qwen2",
        {},
        dict(target_modules=["q_proj", "k_proj", "v_proj", "down_proj"], use_dora=True),
    ),
    "embedding": ("llama", {}, dict(target_modules=["embed_tokens", "q_proj"])),
    "embedding-tied": ("llama", {"tie": True}, dict(target_modules=["embed_tokens", "v_proj"])),
    "modules-to-save": ("llama", {}, dict(target_modules=["q_proj"], modules_to_save=["lm_head"])),
    "fan-in-fan-out-ignored": ("llama", {}, dict(target_modules=["q_proj"], fan_in_fan_out=True)),
}


def peft_case(tmp_path, case):
    """CASES[case] saved as tmp_path/base + tmp_path/ad: (base model, PEFT model, ids, PEFT's unmerged logits)."""
    family, model_kw, lora_kw = CASES[case]
    base = make_model(family, **model_kw)
    save_model(base, tmp_path / "base")
    pm = make_adapter(base, tmp_path / "ad", **lora_kw)
    ids = torch.randint(0, 96, (2, 24))
    return base, pm, ids, hf_logits(pm, ids)


@pytest.mark.parametrize("case", list(CASES))
def test_merge_matches_peft_unmerged(tmp_path, case):
    base, pm, ids, ref = peft_case(tmp_path, case)
    merge(open_model(tmp_path / "base"), [open_adapter(str(tmp_path / "ad"))], tmp_path / "out")
    ours = hf_logits(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out"), ids)
    err = (ours - ref).abs().max().item()
    peft_err = (hf_logits(copy.deepcopy(pm).merge_and_unload(), ids) - ref).abs().max().item()
    assert err < 1e-4, f"{case}: max |Δlogit| {err:.2e} vs PEFT unmerged"
    assert err <= max(10 * peft_err, 1e-5), f"{case}: ours {err:.2e}, PEFT merge_and_unload {peft_err:.2e}"
    assert (ref - hf_logits(base, ids)).abs().max().item() > 1e-2, "the adapter must change the model"


def test_weighted_adapters_match_peft_multi_adapter(tmp_path):
    """--adapter a:0.7 --adapter b:0.3 equals PEFT with both adapters active and each lora_B scaled by its weight."""
    base = make_model("llama")
    save_model(base, tmp_path / "base")
    make_adapter(base, tmp_path / "a", seed=1, target_modules=["q_proj", "v_proj"])
    make_adapter(base, tmp_path / "b", seed=2, target_modules=["v_proj", "down_proj"], r=2)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a", adapter_name="a")
    pm.load_adapter(tmp_path / "b", adapter_name="b")
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B.a" in n:
                p.mul_(0.7)
            if "lora_B.b" in n:
                p.mul_(0.3)
    pm.base_model.set_adapter(["a", "b"])
    ids = torch.randint(0, 96, (2, 20))
    ref = hf_logits(pm, ids)
    merge(
        open_model(tmp_path / "base"),
        [open_adapter(f"{tmp_path / 'a'}:0.7"), open_adapter(f"{tmp_path / 'b'}:0.3")],
        tmp_path / "out",
    )
    ours = hf_logits(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out"), ids)
    assert (ours - ref).abs().max().item() < 1e-4


def test_lora_plus_dora_match_peft_both_active(tmp_path):
    base = make_model("llama")
    save_model(base, tmp_path / "base")
    make_adapter(base, tmp_path / "a", seed=1, target_modules=["q_proj", "up_proj"])
    make_adapter(base, tmp_path / "b", seed=2, target_modules=["q_proj", "down_proj"], use_dora=True)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a", adapter_name="a")
    pm.load_adapter(tmp_path / "b", adapter_name="b")
    pm.base_model.set_adapter(["a", "b"])
    ids = torch.randint(0, 96, (2, 20))
    ref = hf_logits(pm, ids)
    merge(
        open_model(tmp_path / "base"),
        [open_adapter(str(tmp_path / "a")), open_adapter(str(tmp_path / "b"))],
        tmp_path / "out",
    )
    ours = hf_logits(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out"), ids)
    assert (ours - ref).abs().max().item() < 1e-4


def test_fp16_base_stays_fp16_and_is_close(tmp_path):
    base = make_model("llama")
    save_model(base.half(), tmp_path / "base")
    pm = make_adapter(base.float(), tmp_path / "ad", target_modules=ALL, use_dora=True)
    merge(open_model(tmp_path / "base"), [open_adapter(str(tmp_path / "ad"))], tmp_path / "out")
    out = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype="auto")
    assert out.dtype == torch.float16
    ids = torch.randint(0, 96, (1, 16))
    err = (hf_logits(out.float(), ids) - hf_logits(pm, ids)).abs().max().item()
    assert err < 0.05  # fp16 rounding of the merged weights, nothing more
