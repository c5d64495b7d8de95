import pytest
import torch

from lorafast_export.model.decoder import load_decoder
from lorafast_export.weights import open_model
from tests.tiny import hf_logits, make_model, save_model

CASES = [
    ("llama", {}),
    ("llama", {"tie": True}),
    (
        "llama",
        {
            "rope": {
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            }
        },
    ),
    ("llama", {"rope": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}}),
    ("llama", {"kv_heads": 4}),
    ("mistral", {"sliding_window": 8}),
    ("qwen2", {}),
    ("qwen2", {"tie": True}),
]


@pytest.mark.parametrize("family,kw", CASES, ids=[f"{f}-{'-'.join(k) or 'plain'}" for f, k in CASES])
def test_decoder_matches_transformers(tmp_path, family, kw):
    hf = make_model(family, **kw)
    d = save_model(hf, tmp_path / "m")
    dec = load_decoder(open_model(d))
    ids = torch.randint(0, 96, (2, 40))
    ref = hf_logits(hf, ids)
    with torch.no_grad():
        out, present = dec(ids)
    assert (out - ref).abs().max().item() < 1e-5
    # with cache: prefill 25 tokens, then feed the rest in chunks of 1 and 14
    with torch.no_grad():
        l1, past = dec(ids[:, :25])
        l2, past = dec(ids[:, 25:26], past=past)
        l3, past = dec(ids[:, 26:], past=past)
    cached = torch.cat([l1, l2, l3], dim=1)
    assert (cached - ref).abs().max().item() < 1e-5
    c = hf.config
    assert past[0][0].shape == (2, c.num_key_value_heads, 40, c.hidden_size // c.num_attention_heads)
