import pytest
import torch
import torch.nn.functional as F

from lorafast_export.runtime.attention import decode_flex, decode_gather
from lorafast_export.testing import scattered_pool


def reference(q, dense, window=None):
    outs = []
    for i, (k, v) in enumerate(dense):
        if window is not None:
            k, v = k[:, -window:], v[:, -window:]
        outs.append(F.scaled_dot_product_attention(q[i : i + 1], k[None], v[None], enable_gqa=True))
    return torch.cat(outs)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_decode_kernels_match_dense_attention():
    lengths = [1, 4, 5, 13]
    k_pool, v_pool, tables, lens, dense = scattered_pool(lengths)
    q = torch.randn(len(lengths), 4, 1, 8)
    ref = reference(q, dense)
    assert (decode_gather(q, k_pool, v_pool, tables, lens, 4) - ref).abs().max() < 1e-5
    assert (decode_flex(q, k_pool, v_pool, tables, lens, 4) - ref).abs().max() < 1e-5


def test_decode_gather_sliding_window():
    k_pool, v_pool, tables, lens, dense = scattered_pool([3, 11], seed=1)
    q = torch.randn(2, 4, 1, 8)
    out = decode_gather(q, k_pool, v_pool, tables, lens, 4, window=5)
    assert (out - reference(q, dense, window=5)).abs().max() < 1e-5
