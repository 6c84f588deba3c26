from __future__ import annotations

import pytest

from outrider.workers.kv_cache import KVCacheFull, KVCacheManager


def test_append_truncate_free_roundtrip() -> None:
    kv = KVCacheManager(num_blocks=6, block_size=4)
    slots = kv.append(7, 6)
    assert len(slots) == 6 and len(set(slots)) == 6
    assert kv.num_used_blocks == 2 and kv.num_tokens(7) == 6
    table = kv.block_table(7)
    assert slots == [table[p // 4] * 4 + p % 4 for p in range(6)]
    kv.truncate(7, 3)
    assert kv.num_tokens(7) == 3 and kv.num_used_blocks == 1
    again = kv.append(7, 3)
    assert again[0] == slots[3]  # position 3 reuses its old slot
    kv.truncate(7, 0)
    assert kv.num_used_blocks == 0
    assert kv.free(7) and not kv.free(7)
    assert kv.num_free_blocks == 6


def test_full_cache_raises_and_keeps_state() -> None:
    kv = KVCacheManager(num_blocks=2, block_size=4)
    kv.append(1, 8)
    with pytest.raises(KVCacheFull, match="needs 1 more blocks"):
        kv.append(2, 1)
    assert not kv.has(2)
    assert kv.blocks_needed(1, 8, 1) == 1
    assert kv.blocks_needed(1, 4, 4) == 0


def test_truncate_beyond_length_is_an_error() -> None:
    kv = KVCacheManager(num_blocks=2, block_size=4)
    kv.append(1, 2)
    with pytest.raises(ValueError, match="cannot truncate to 5"):
        kv.truncate(1, 5)
