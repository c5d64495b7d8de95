import pytest
import torch

from lorafast_export.errors import InputError
from lorafast_export.runtime.kv_cache import PAD_BLOCK, BlockAllocator, CacheConfig, OutOfBlocks, PagedKVCache


def make_cache(num_blocks=6, block_size=4):
    return PagedKVCache(
        2, 2, 8, CacheConfig(block_size=block_size, num_blocks=num_blocks), torch.float32, "cpu"
    )


def test_allocator_never_hands_out_pad_block_and_reuses_freed_first():
    a = BlockAllocator(4)
    got = a.allocate(3)
    assert PAD_BLOCK not in got and len(set(got)) == 3
    a.free(got[1:2])
    assert a.allocate(1) == got[1:2]
    with pytest.raises(OutOfBlocks, match="need 2 block"):
        a.allocate(2)


def test_sequences_grow_block_by_block_and_free():
    c = make_cache()
    c.reserve(0, 3)
    assert len(c.tables[0]) == 1
    c.reserve(0, 4)
    assert len(c.tables[0]) == 1
    c.reserve(0, 5)
    assert len(c.tables[0]) == 2
    c.reserve(1, 9)
    assert len(c.tables[1]) == 3 and c.allocator.free_count == 1
    assert not set(c.tables[0]) & set(c.tables[1])
    c.free(0)
    assert c.allocator.free_count == 3 and 0 not in c.tables
    c.reserve(2, 12)  # reuses the freed blocks
    assert c.allocator.free_count == 0


def test_out_of_blocks_is_clear_and_leaves_no_empty_table():
    c = make_cache(num_blocks=2)
    c.reserve(0, 8)
    with pytest.raises(OutOfBlocks, match="raise the cache budget"):
        c.reserve(1, 1)
    assert 1 not in c.tables
    assert not c.can_fit(1)


def test_slots_and_block_tables():
    c = make_cache(block_size=4)
    c.reserve(7, 6)
    t = c.tables[7]
    assert c.slots(7, 0, 6).tolist() == [t[0] * 4 + i for i in range(4)] + [t[1] * 4, t[1] * 4 + 1]
    bt = c.block_table([7], width=4, rows=3)
    assert bt.shape == (3, 4) and bt.dtype == torch.int32
    assert bt[0].tolist() == t + [PAD_BLOCK] * 2 and bt[1:].eq(PAD_BLOCK).all()


def test_pool_shape_and_budget():
    c = make_cache(num_blocks=6, block_size=4)
    assert len(c.k) == 2 and c.k[0].shape == (2, 7 * 4, 8)  # one pool per layer, + the pad block
    per_token = 2 * 2 * 2 * 8 * 4
    cfg = CacheConfig(block_size=4, budget_bytes=per_token * 4 * 5)
    assert cfg.resolve_blocks(per_token) == 5
    with pytest.raises(InputError, match="power of two"):
        CacheConfig(block_size=12)
