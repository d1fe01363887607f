"""The paged KV cache's sizing and the block manager's bookkeeping."""

from __future__ import annotations

import pytest
import torch

from engine.kv_cache import BlockManager, KVCache
from engine.request import GenerationRequest
from engine.sequence import Sequence


def seq(n: int) -> Sequence:
    ids = list(range(3, 3 + n))
    return Sequence(GenerationRequest(id=f"s{n}", prompt_token_ids=ids), ids, n)


def test_cache_sized_from_byte_budget():
    # one block: K and V, 2 layers, 4 tokens, 2 heads, 8 dims, fp32 = 2*2*4*2*8*4 = 1024 bytes
    cache = KVCache(num_layers=2, num_kv_heads=2, head_dim=8, block_size=4, budget_bytes=10_000,
                    device=torch.device("cpu"), dtype=torch.float32)
    assert cache.bytes_per_block == 1024
    assert cache.num_blocks == 9
    assert cache.capacity_tokens == 36
    assert len(cache.k) == len(cache.v) == 2
    assert cache.k[1].shape == (9, 4, 2, 8)
    assert cache.k[0].data_ptr() != cache.v[0].data_ptr()
    half = KVCache(2, 2, 8, 4, 10_000, torch.device("cpu"), torch.bfloat16)
    assert half.num_blocks == 19


def test_budget_below_one_block_is_refused():
    with pytest.raises(ValueError, match="holds no block"):
        KVCache(2, 2, 8, 4, 1000, torch.device("cpu"), torch.float32)


def test_allocate_deallocate_round_trip():
    bm = BlockManager(num_blocks=6, block_size=4)
    a, b = seq(5), seq(8)
    assert bm.can_allocate(a)
    bm.allocate(a)
    assert len(a.block_table) == 2 and bm.num_free == 4
    bm.allocate(b)
    assert len(b.block_table) == 2 and bm.num_used == 4
    assert not set(a.block_table) & set(b.block_table)
    bm.deallocate(a)
    assert a.block_table == [] and bm.num_free == 4
    bm.deallocate(b)
    assert bm.num_free == 6


def test_can_allocate_counts_every_token():
    bm = BlockManager(num_blocks=2, block_size=4)
    assert bm.can_allocate(seq(8))
    assert not bm.can_allocate(seq(9))
    with pytest.raises(RuntimeError):
        bm.allocate(seq(9))
    assert bm.num_free == 2  # a refused allocation takes nothing


def test_append_takes_a_block_only_at_a_boundary():
    bm = BlockManager(num_blocks=3, block_size=4)
    s = seq(4)
    bm.allocate(s)
    assert len(s.block_table) == 1
    s.token_ids.append(99)  # token 5 needs a second block
    assert bm.can_append(s)
    bm.append(s)
    assert len(s.block_table) == 2
    for _ in range(3):  # tokens 6..8 fit in block 2
        s.token_ids.append(99)
        bm.append(s)
    assert len(s.block_table) == 2 and bm.num_free == 1


def test_can_append_false_when_full():
    bm = BlockManager(num_blocks=1, block_size=4)
    s = seq(4)
    bm.allocate(s)
    assert bm.can_append(s)  # the newest token's K/V already has a place
    s.token_ids.append(99)
    assert not bm.can_append(s)
    with pytest.raises(RuntimeError):
        bm.append(s)
