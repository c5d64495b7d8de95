import pytest
import torch
import torch.nn.functional as F

from lorafast_export.runtime.attention import decode_flex, decode_gather


def scattered_pool(lengths, hkv=2, d=8, bs=4, seed=0):
    """Random keys/values of each sequence written to shuffled physical blocks; dense copies for reference."""
    g = torch.Generator().manual_seed(seed)
    n_blocks = sum(-(-n // bs) for n in lengths) + 3
    k_pool, v_pool = torch.randn(2, hkv, (n_blocks + 1) * bs, d, generator=g).unbind(0)
    free = (torch.randperm(n_blocks, generator=g) + 1).tolist()
    width = max(-(-n // bs) for n in lengths) + 1
    tables, dense = torch.zeros(len(lengths), width, dtype=torch.int32), []
    for i, n in enumerate(lengths):
        blocks = [free.pop() for _ in range(-(-n // bs))]
        tables[i, : len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        idx = torch.tensor([blocks[t // bs] * bs + t % bs for t in range(n)])
        dense.append((k_pool[:, idx], v_pool[:, idx]))
    return k_pool, v_pool, tables, torch.tensor(lengths), dense


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
