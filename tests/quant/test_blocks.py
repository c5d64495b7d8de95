"""The calibration walk's forward passes: SDPA's causal kernel instead of the mask, bf16 autocast on CUDA."""

import pytest
import torch

from lorafast_export.model.decoder import DecoderLayer, Rotary, causal_mask
from lorafast_export.quant.blocks import LAYER_GROUPS, Block, causal_kernel, compute_dtype
from lorafast_export.weights import open_model
from tests.quant.pipeline_helpers import tiny_checkpoint


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    return open_model(tiny_checkpoint(tmp_path_factory.mktemp("blocks") / "llama", "llama")).config


def test_causal_kernel_equals_the_explicit_mask(cfg):
    torch.manual_seed(0)
    layer = DecoderLayer(cfg).eval()
    x = torch.randn(2, 16, cfg.hidden_size)
    cos, sin = Rotary(cfg)(torch.arange(16)[None], torch.float32)
    with torch.no_grad():
        masked = layer(x, cos, sin, causal_mask(16, 0, "cpu"))[0]
        causal = layer(x, cos, sin, None, None, True)[0]
    assert torch.allclose(causal, masked, atol=1e-5), float((causal - masked).abs().max())
    with pytest.raises(ValueError, match="is_causal"):
        layer(x, cos, sin, causal_mask(16, 0, "cpu"), None, True)


def test_walk_precision_and_attention_kernel_per_device():
    assert compute_dtype("cpu") is None and compute_dtype("cuda") is torch.bfloat16
    assert not causal_kernel("cpu", 2048, None)  # the CPU keeps its explicit mask
    assert causal_kernel("cuda", 2048, None) and causal_kernel("cuda", 2048, 2048)
    assert not causal_kernel("cuda", 2048, 1024)  # a sliding window inside the sequence needs the mask


def test_cpu_block_runs_in_float32(cfg):
    layer = DecoderLayer(cfg).eval()
    x = torch.randn(3, 8, cfg.hidden_size)
    cos, sin = Rotary(cfg)(torch.arange(8)[None], torch.float32)
    block = Block(layer, LAYER_GROUPS, x, lambda m, xc: m(xc, cos, sin, causal_mask(8, 0, "cpu"))[0], chunk=2)
    seen = []
    out = block.run({"mlp.down_proj": seen.append})
    assert out.dtype == torch.float32 and all(t.dtype == torch.float32 for t in seen) and len(seen) == 2


def test_frozen_modules_replay_their_outputs(cfg, monkeypatch):
    """freeze: later forwards replay the recorded outputs of final modules (the whole self_attn once its four
    linears are final) and give bit-identical results; hooked modules, and containers of them, still run."""
    torch.manual_seed(0)
    layer = DecoderLayer(cfg).eval()
    x = torch.randn(3, 8, cfg.hidden_size)
    cos, sin = Rotary(cfg)(torch.arange(8)[None], torch.float32)
    block = Block(layer, LAYER_GROUPS, x, lambda m, xc: m(xc, cos, sin, causal_mask(8, 0, "cpu"))[0], chunk=2)
    calls: dict[str, int] = {}
    for name in ("self_attn", "self_attn.q_proj", "mlp.gate_proj", "mlp.down_proj"):
        block.get(name).register_forward_pre_hook(
            lambda *_, n=name: calls.__setitem__(n, calls.get(n, 0) + 1)
        )
    fresh = block.run()
    block.freeze(["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"])
    assert block.frozen == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"}
    block.run({"self_attn.o_proj": lambda _: None}, stop_after="self_attn.o_proj")  # records q/k/v
    assert sorted(block.recorded) == ["self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj"]
    block.freeze(["self_attn.o_proj"])
    assert "self_attn" in block.frozen
    calls.clear()
    assert torch.equal(block.run(), fresh)  # records self_attn (q/k/v replayed inside it), runs the MLP
    assert calls == {"self_attn": 2, "mlp.gate_proj": 2, "mlp.down_proj": 2}  # 2 chunks; q_proj replayed
    assert sorted(block.recorded) == ["self_attn"]  # its parts' records are dropped
    calls.clear()
    seen = []
    assert torch.equal(block.run({"mlp.down_proj": seen.append}), fresh)
    assert calls == {"mlp.gate_proj": 2, "mlp.down_proj": 2} and len(seen) == 2  # self_attn replayed
    calls.clear()
    hooked = block.run({"self_attn.o_proj": lambda _: None})  # a hook inside: self_attn and its parts run
    assert torch.equal(hooked, fresh) and calls["self_attn"] == calls["self_attn.q_proj"] == 2
    monkeypatch.setattr("lorafast_export.quant.blocks.REPLAY_MIN_BYTES", 0)
    small = Block(layer, LAYER_GROUPS, x, block.call, chunk=2)  # x is 3 x 8 x 64 floats: q_proj's output fits
    small.freeze(["mlp.gate_proj", "mlp.up_proj"])  # each output 3 x 8 x 128: twice x, too large to keep
    small.run()
    assert small.recorded == {}
