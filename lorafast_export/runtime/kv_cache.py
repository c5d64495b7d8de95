"""Paged KV cache: fixed-size blocks in one preallocated pool, a block table per sequence.

Layout: one k and one v tensor per layer, [kv_heads, num_blocks * block_size, head_dim] each (separate
tensors, not views of one: inductor writes a graph input in place only when it is not a view, and copied
the whole pool every step otherwise). Token t of a sequence lives at
physical slot `table[t // block_size] * block_size + t % block_size`. The head-major layout lets
FlexAttention read the pool as one long key sequence ([1, kv_heads, slots, head_dim]) and the gather path
index whole token rows. Block 0 is never handed out: padded batch rows write their (discarded) keys there,
so a static-shape decode step needs no branch for padding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lorafast_export.errors import InputError, LorafastError

PAD_BLOCK = 0  # scratch block for padded batch rows; never allocated to a sequence


class OutOfBlocks(LorafastError):
    """The pool has no free block left; the engine preempts or waits, a direct caller frees sequences first."""


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    num_blocks: int = 0  # 0: derive from max_tokens or budget_bytes
    max_tokens: int = 0  # total tokens the pool must hold (all sequences together)
    budget_bytes: int = 0  # alternative: size the pool to this many bytes of k+v

    def __post_init__(self) -> None:
        problems = []
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            problems.append(f"block_size={self.block_size}: use a power of two such as 16")
        for name in ("num_blocks", "max_tokens", "budget_bytes"):
            if getattr(self, name) < 0:
                problems.append(f"{name}={getattr(self, name)} must be >= 0")
        if problems:
            raise InputError("CacheConfig: " + "; ".join(problems))

    def resolve_blocks(self, bytes_per_token: int) -> int:
        """Usable blocks (excluding the pad block) this config asks for."""
        if self.num_blocks:
            return self.num_blocks
        if self.budget_bytes:
            return self.budget_bytes // (bytes_per_token * self.block_size)
        if self.max_tokens:
            return math.ceil(self.max_tokens / self.block_size)
        raise InputError("CacheConfig: set one of num_blocks, max_tokens or budget_bytes.")


class BlockAllocator:
    """Free list of block ids 1..n (0 is the pad block). LIFO, so a freed block is reused first."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks, 0, -1))

    @property
    def free_count(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfBlocks(
                f"paged KV cache: need {n} block(s), {len(self._free)} free of {self.num_blocks}. "
                "Finish or preempt sequences, or raise the cache budget (num_blocks/budget_bytes)."
            )
        taken, self._free = self._free[len(self._free) - n :], self._free[: len(self._free) - n]
        return taken[::-1]

    def free(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))


class PagedKVCache:
    """The pool tensors plus the block table of every live sequence."""

    def __init__(
        self,
        num_layers: int,
        kv_heads: int,
        head_dim: int,
        config: CacheConfig,
        dtype: torch.dtype,
        device: str | torch.device,
    ):
        self.config, self.block_size = config, config.block_size
        per_token = 2 * num_layers * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()
        usable = config.resolve_blocks(per_token)
        if usable < 1:
            raise InputError(
                f"paged KV cache: the budget holds no block of {self.block_size} tokens "
                f"({per_token} bytes a token); raise budget_bytes."
            )
        slots = (usable + 1) * self.block_size  # + the pad block
        shape = (kv_heads, slots, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.slots_total = slots
        self.allocator = BlockAllocator(usable)
        self.tables: dict[int, list[int]] = {}
        self.lengths: dict[int, int] = {}  # tokens whose k/v are (or are about to be) written

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.k + self.v)

    def blocks_for(self, n_tokens: int) -> int:
        return math.ceil(n_tokens / self.block_size)

    def can_fit(self, n_tokens: int) -> bool:
        return self.blocks_for(n_tokens) <= self.allocator.free_count

    def reserve(self, seq_id: int, new_len: int) -> None:
        """Grow sequence seq_id (created if new) so it has room for new_len tokens."""
        table = self.tables.setdefault(seq_id, [])
        need = self.blocks_for(new_len) - len(table)
        if need > 0:
            try:
                table.extend(self.allocator.allocate(need))
            except OutOfBlocks:
                if not table:
                    del self.tables[seq_id]
                raise
        self.lengths[seq_id] = max(new_len, self.lengths.get(seq_id, 0))

    def free(self, seq_id: int) -> None:
        self.allocator.free(self.tables.pop(seq_id, []))
        self.lengths.pop(seq_id, None)

    def slots(self, seq_id: int, start: int, end: int) -> torch.Tensor:
        """[end - start] int64 physical slots of token positions start..end-1 of seq_id."""
        table = torch.tensor(self.tables[seq_id], dtype=torch.long)
        pos = torch.arange(start, end)
        return table[pos // self.block_size] * self.block_size + pos % self.block_size

    def block_table(self, seq_ids: list[int], width: int, rows: int | None = None) -> torch.Tensor:
        """[rows, width] int32 block tables, padded with the pad block (rows beyond seq_ids too)."""
        out = torch.full((rows or len(seq_ids), width), PAD_BLOCK, dtype=torch.int32)
        for i, s in enumerate(seq_ids):
            t = self.tables[s]
            out[i, : len(t)] = torch.tensor(t, dtype=torch.int32)
        return out
