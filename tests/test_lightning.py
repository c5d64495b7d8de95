"""Adapters read from a checkpoint written by PyTorch Lightning merge exactly as from a PEFT directory."""

import copy

import lightning as L
import peft
import pytest
import torch
import transformers
from click.testing import CliRunner

from lorafast_export.adapters import open_adapter
from lorafast_export.cli import main
from tests.tiny import hf_logits, make_model, save_model


class LitLora(L.LightningModule):
    def __init__(self, base, r=4, lora_alpha=8, use_dora=False, hparams_style="flat"):
        super().__init__()
        cfg = peft.LoraConfig(
            r=r,
            lora_alpha=lora_alpha,
            use_dora=use_dora,
            init_lora_weights=False,
            target_modules=["q_proj", "v_proj", "down_proj"],
        )
        self.model = peft.get_peft_model(copy.deepcopy(base), cfg)
        if hparams_style == "flat":
            self.save_hyperparameters({"lora_r": r, "lora_alpha": lora_alpha, "lr": 1e-3})
        elif hparams_style == "nested":
            self.save_hyperparameters({"peft_config": {"r": r, "lora_alpha": lora_alpha}, "lr": 1e-3})

    def training_step(self, batch, _):
        ids = batch[0]
        return self.model(input_ids=ids, labels=ids).loss

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.5)


def write_ckpt(tmp_path, base, **kw):
    lit = LitLora(base, **kw)
    data = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.randint(0, 96, (4, 16))), batch_size=2
    )
    trainer = L.Trainer(
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        default_root_dir=tmp_path,
    )
    trainer.fit(lit, data)
    path = tmp_path / "epoch=0.ckpt"
    trainer.save_checkpoint(path)
    return lit.model.eval(), path


@pytest.mark.parametrize("style,dora", [("flat", False), ("nested", True)])
def test_lightning_checkpoint_merges_exactly(tmp_path, style, dora):
    base = make_model("llama")
    save_model(base, tmp_path / "base")
    pm, ckpt = write_ckpt(tmp_path, base, use_dora=dora, hparams_style=style)
    ad = open_adapter(str(ckpt), allow_pickle=True)
    assert ad.use_dora == dora and len(ad.modules) == 6
    r = CliRunner().invoke(
        main,
        [
            "-q",
            "merge",
            "--base",
            str(tmp_path / "base"),
            "--adapter",
            str(ckpt),
            "--out",
            str(tmp_path / "m"),
            "--allow-pickle",
        ],
        catch_exceptions=False,
    )
    assert r.exit_code == 0, r.output
    ids = torch.randint(0, 96, (2, 12))
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert (hf_logits(merged, ids) - hf_logits(pm, ids)).abs().max() < 1e-4


def test_lightning_needs_allow_pickle_and_alpha(tmp_path):
    base = make_model("llama")
    save_model(base, tmp_path / "base")
    pm, ckpt = write_ckpt(tmp_path, base, hparams_style="none", lora_alpha=12)
    args = ["merge", "--base", str(tmp_path / "base"), "--adapter", str(ckpt), "--out", str(tmp_path / "m")]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2 and "--allow-pickle" in r.output
    r = CliRunner().invoke(main, [*args, "--allow-pickle"])
    assert r.exit_code == 2 and "lora_alpha" in r.output
    r = CliRunner().invoke(main, [*args, "--allow-pickle", "--lora-alpha", "12"])
    assert r.exit_code == 0, r.output
    ids = torch.randint(0, 96, (1, 12))
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert (hf_logits(merged, ids) - hf_logits(pm, ids)).abs().max() < 1e-4
