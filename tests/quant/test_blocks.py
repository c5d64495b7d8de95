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
