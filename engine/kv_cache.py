"""Paged KV cache with a fixed byte budget, and the block manager that hands its blocks out.

Why not transformers' `PagedAttentionCache` (generation.continuous_batching)? We read it first. It
is bound to its own `RequestState`/scheduler and sizes itself from free device memory, while we
need a hard byte budget and our own adapter-aware admission. Its SDPA path reads the cache by
packing every request into one sequence with a block-diagonal mask, which is quadratic in the batch
on decode (slower here than a padded `generate`). So we keep the layout it and vLLM use
([num_blocks, block_size, kv_heads, head_dim] per layer) and a block table per sequence. The runner
reads it with one flat gather index per step + torch SDPA (model_runner); on CPU decode rows read
their context from dense copies kept between steps instead (engine/decode_lanes.py).
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from engine.sequence import Sequence


class KVCache:
    """K and V for every layer: `k[layer]`, `v[layer]` are [num_blocks, block_size, kv_heads, head_dim].
    Token t of a sequence lives in block `block_table[t // block_size]` at offset `t % block_size`,
    i.e. at flat slot `block_table[t // block_size] * block_size + t % block_size`."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, block_size: int,
                 budget_bytes: int, device: torch.device, dtype: torch.dtype) -> None:
        self.block_size = block_size
        self.bytes_per_block = 2 * num_layers * block_size * num_kv_heads * head_dim * dtype.itemsize
        self.num_blocks = budget_bytes // self.bytes_per_block
        if self.num_blocks < 1:
            raise ValueError(f"kv_cache_bytes={budget_bytes} holds no block: one block of "
                             f"{block_size} tokens needs {self.bytes_per_block} bytes")
        shape = (2, num_layers, self.num_blocks, block_size, num_kv_heads, head_dim)
        self._storage = torch.zeros(shape, device=device, dtype=dtype)
        self.k = list(self._storage[0])  # per layer [num_blocks, block_size, kv_heads, head_dim]
        self.v = list(self._storage[1])

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size


class BlockManager:
    """Free list of cache blocks; each sequence owns `seq.block_table` (block ids, in token order).
    No prefix sharing: LoRA rows with the same prompt but different adapters have different KV."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, seq: Sequence) -> bool:
        """Room for every token the sequence has now (prompt, plus outputs when recomputing): all of
        its blocks are taken at admission, even when its prompt is then prefilled in chunks."""
        return self.blocks_for(seq.num_tokens) <= len(self._free)

    def allocate(self, seq: Sequence) -> None:
        assert not seq.block_table, "sequence already holds blocks"
        need = self.blocks_for(seq.num_tokens)
        if need > len(self._free):
            raise RuntimeError(f"allocate: need {need} blocks, {len(self._free)} free")
        seq.block_table = [self._free.popleft() for _ in range(need)]

    def deallocate(self, seq: Sequence) -> None:
        self._free.extend(reversed(seq.block_table))
        seq.block_table = []
        seq.num_computed_tokens = 0  # nothing of it is cached any more: a recompute starts from token 0

    def can_append(self, seq: Sequence) -> bool:
        """Room for the K/V of the sequence's newest token (written by the next decode step)."""
        return self.blocks_for(seq.num_tokens) - len(seq.block_table) <= len(self._free)

    def append(self, seq: Sequence) -> None:
        while len(seq.block_table) < self.blocks_for(seq.num_tokens):
            if not self._free:
                raise RuntimeError("append: no free block")
            seq.block_table.append(self._free.popleft())
