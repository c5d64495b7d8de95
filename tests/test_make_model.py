"""scripts/make_model.py writes what transformers, PEFT and our own loader read as the same model."""

from __future__ import annotations

import json

import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file

from lorafast_export.adapters import open_adapter
from lorafast_export.merge import merged_state, plan_merge
from lorafast_export.weights import open_model
from scripts.make_model import main, make_adapter, make_base, shape_of

TINY = dict(hidden=64, inter=96, layers=3, heads=4, kv_heads=2, vocab=80, max_pos=128)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_sharded_base_loads_in_transformers(tmp_path, family):
    info = make_base(tmp_path, shape_of(**TINY), family=family, dtype="float32", shard_gb=40e-6, device="cpu")
    assert info["shards"] > 2  # really sharded, with an index like the Hub's
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    on_disk = {}
    for f in sorted(set(index["weight_map"].values())):
        on_disk |= load_file(str(tmp_path / f))
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in on_disk.values())
    model, loading = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not loading["missing_keys"] and not loading["unexpected_keys"]
    assert (
        type(model).__name__
        == {"llama": "Llama", "qwen2": "Qwen2", "mistral": "Mistral"}[family] + "ForCausalLM"
    )
    state = model.state_dict()
    assert sum(p.numel() for p in model.parameters()) == info["params"]
    for name, t in on_disk.items():
        assert torch.equal(state[name], t), name
    if family == "qwen2":
        assert state["model.layers.0.self_attn.q_proj.bias"].abs().sum() > 0
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    ids = tok("def f(x): return x")["input_ids"]
    assert ids[0] == model.config.bos_token_id and max(ids) < TINY["vocab"]


def test_weights_do_not_depend_on_sharding(tmp_path):
    make_base(tmp_path / "one", shape_of(**TINY), dtype="float16", device="cpu")
    make_base(tmp_path / "many", shape_of(**TINY), dtype="float16", shard_gb=20e-6, device="cpu")
    one = load_file(str(tmp_path / "one" / "model.safetensors"))
    many = {}
    for f in (tmp_path / "many").glob("model-*.safetensors"):
        many |= load_file(str(f))
    assert one.keys() == many.keys() and all(torch.equal(one[k], many[k]) for k in one)


def test_large_vocab_reuses_demo_tokenizer(tmp_path):
    make_base(tmp_path, shape_of(**{**TINY, "vocab": 4096}), dtype="float32", device="cpu")
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert len(tok) == 2048 and max(tok("import os\nprint(os.sep)")["input_ids"]) < 2048


@pytest.mark.parametrize("dora", [False, True])
def test_adapter_is_what_peft_loads_and_our_merge_matches_it(tmp_path, dora):
    """PEFT loads every tensor we wrote, B is non-zero, the adapter changes the logits, and our merge of the
    generated files reproduces PEFT's unmerged forward."""
    make_base(tmp_path / "b", shape_of(**TINY), dtype="float32", shard_gb=40e-6, device="cpu")
    make_adapter(tmp_path / "a", tmp_path / "b", r=4, alpha=8, dora=dora, device="cpu")
    written = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    assert len(written) == TINY["layers"] * 7 * (3 if dora else 2)
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "b")
    ids = torch.randint(0, TINY["vocab"], (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base_logits = base(ids).logits
        pm = peft.PeftModel.from_pretrained(base, tmp_path / "a").eval()
        ref = pm(ids).logits
    loaded = peft.get_peft_model_state_dict(pm)  # the saved form, as peft's save_pretrained would write it
    assert loaded.keys() == written.keys()
    for k, t in written.items():
        assert torch.equal(loaded[k], t), k
        if "lora_B" in k:
            assert t.abs().min() > 0
    assert pm.peft_config["default"].use_dora is dora
    delta = (ref - base_logits).abs().max()
    assert 1e-3 < delta < base_logits.abs().max()  # a real but moderate change
    ad = open_adapter(str(tmp_path / "a"))
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "b")
    merged.load_state_dict(merged_state(plan_merge(open_model(tmp_path / "b"), [ad])), strict=False)
    with torch.no_grad():
        assert (merged(ids).logits - ref).abs().max() < 1e-4


def test_cli_presets_and_bad_shape(tmp_path, capsys):
    assert (
        main(["both", str(tmp_path / "m"), "--preset", "demo-like", "--layers", "1", "--device", "cpu"]) == 0
    )
    cfg = json.loads((tmp_path / "m" / "base" / "config.json").read_text())
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"]) == (256, 1, 2048)
    assert (tmp_path / "m" / "lora" / "adapter_config.json").exists()
    assert main(["base", str(tmp_path / "x"), "--hidden", "64"]) == 2
    assert "shape needs" in capsys.readouterr().err


def test_widened_demo_computes_the_demos_function_in_transformers():
    """scripts/make_model.py widen: the trained demo laid into a wider, deeper shape (head_dim 64 -> 128, so rope
    theta and the attention scale change too) gives transformers' own logits of the demo on the demo's vocabulary,
    and the same greedy tokens over the whole wide vocabulary (its extra head rows never win)."""
    from scripts.make_model import DEMO_BASE, widen

    small = transformers.AutoModelForCausalLM.from_pretrained(DEMO_BASE, dtype=torch.float32).eval()
    config = json.loads((DEMO_BASE / "config.json").read_text())
    shape = dict(hidden=1024, inter=1024, layers=6, heads=8, kv_heads=4, vocab=4096, max_pos=1024)
    cfg, state = widen(config, small.state_dict(), shape, dtype=torch.float32)
    assert cfg["head_dim"] == 128 and cfg["rope_parameters"]["rope_theta"] == 1e8
    wide = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).eval()
    missing, unexpected = wide.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in k for k in missing)
    tok = transformers.AutoTokenizer.from_pretrained(DEMO_BASE)
    ids = tok(
        "def read_config(path):\n    with open(path) as f:\n        return json.load(f)\n",
        return_tensors="pt",
    )
    with torch.no_grad():
        want = small(**ids).logits
        got = wide(**ids).logits
        assert got.shape[-1] == 4096 and (got[..., :2048] - want).abs().max() <= 1e-4 * want.abs().max()
        assert torch.equal(got.argmax(-1), want.argmax(-1))
        kw = dict(max_new_tokens=24, do_sample=False, pad_token_id=2)
        want_tokens = small.generate(**ids, **kw)
        assert torch.equal(wide.generate(**ids, **kw), want_tokens)
    # our runtime reads the widened config (rope theta 1e8, eps / 4) as transformers does: the demo's tokens
    from lorafast_export.model.spec import ModelConfig
    from lorafast_export.runtime.loader import build_runtime
    from lorafast_export.runtime.options import RuntimeOptions

    opts = RuntimeOptions(compile="off", max_seq_len=128, max_batch=1, batch_buckets=(1,))
    rt = build_runtime(ModelConfig.from_dict(cfg), state, None, "cpu", torch.float32, opts)
    prompt = ids["input_ids"][0].tolist()
    assert rt.generate_batch([prompt], 24)[0] == want_tokens[0, len(prompt) :].tolist()
    # a change that breaks the function is seen: the old rope theta
    bad = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**{**cfg, "rope_parameters": config["rope_parameters"]})
    )
    bad.load_state_dict(state, strict=False)
    with torch.no_grad():
        assert (bad.eval()(**ids).logits[..., :2048] - want).abs().max() > 1e-2 * want.abs().max()


def test_widen_refuses_a_narrower_shape():
    from scripts.make_model import DEMO_BASE, widen

    config = json.loads((DEMO_BASE / "config.json").read_text())
    with pytest.raises(ValueError, match="hidden 256 > 128"):
        widen(config, {}, dict(shape_of("demo-like"), hidden=128))


def test_widened_demo_and_lora_on_disk_give_the_demos_peft_model(tmp_path):
    """make_model.py widen --base --adapter writes a sharded base and a PEFT LoRA that transformers + PEFT load as
    the fine-tuned demo: the wide model's logits on the demo's vocabulary are the small PEFT model's, and the LoRA
    changes them as it changes the demo's (the widened delta is in place, not lost)."""
    from scripts.make_model import DEMO_BASE

    demo = DEMO_BASE.parent
    shape = "--hidden 512 --inter 768 --layers 5 --heads 4 --kv-heads 2 --vocab 2100".split()
    assert main(["widen", str(tmp_path), "--base", str(demo / "base"), "--adapter", str(demo / "lora"),
                 "--dtype", "float32", "--shard-gb", "0.004", "--device", "cpu", *shape]) == 0  # fmt: skip
    assert (tmp_path / "base" / "model.safetensors.index.json").exists()  # sharded like the Hub's

    def peft_logits(base, lora, ids):
        m = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        with torch.no_grad():
            plain = m(ids).logits
            return plain, peft.PeftModel.from_pretrained(m, lora).eval()(ids).logits

    ids = torch.tensor([[5, 300, 17, 900, 2047, 44, 12, 1024, 7, 8]])
    small_plain, small_tuned = peft_logits(demo / "base", demo / "lora", ids)
    wide_plain, wide_tuned = peft_logits(tmp_path / "base", tmp_path / "lora", ids)
    top = small_tuned.abs().max()
    assert (wide_tuned[..., :2048] - small_tuned).abs().max() <= 1e-4 * top
    assert (wide_plain[..., :2048] - small_plain).abs().max() <= 1e-4 * top
    assert (small_tuned - small_plain).abs().max() > 1e-2 * top  # the adapter does something
    assert torch.equal(wide_tuned.argmax(-1), small_tuned.argmax(-1))


def test_widen_cli_refuses_what_it_cannot_widen(tmp_path, capsys):
    """A DoRA adapter (its magnitudes are per output row: zero rows would divide by zero) and a missing --base are
    refused with exit 2 and a message naming what to change."""
    from scripts.make_model import DEMO_BASE

    demo = DEMO_BASE.parent
    shape = "--hidden 512 --inter 768 --layers 5 --heads 4 --kv-heads 2 --vocab 2100".split()
    args = [
        "widen",
        str(tmp_path / "w"),
        "--adapter",
        str(demo / "dora"),
        "--dtype",
        "float32",
        "--device",
        "cpu",
    ]
    assert main([*args, "--base", str(demo / "base"), *shape]) == 2
    assert "only a plain LoRA is widened" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()  # refused before anything was written
    assert main([*args, *shape]) == 2
    assert "--base DIR (the trained model) is required" in capsys.readouterr().err
