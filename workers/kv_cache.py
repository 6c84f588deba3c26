"""Paged KV cache bookkeeping: block tables per sequence, append, truncate-to-length, free.

The tensors themselves are one ``(k_cache, v_cache)`` pair per local layer, each
``[num_blocks, block_size, num_kv_heads, head_dim]``. Truncation is how speculative rollback
happens: a delta ``(seq_id, start_pos, token_ids)`` first truncates the sequence to
``start_pos`` and then appends, so a retried call is idempotent.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


class KVCacheFull(RuntimeError):
    """Not enough free blocks for the requested append."""


@dataclass
class _SeqBlocks:
    blocks: list[int] = field(default_factory=list)
    num_tokens: int = 0


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(
                f"need num_blocks > 0 and block_size > 0, got {num_blocks}, {block_size}"
            )
        self.num_blocks = num_blocks
        self.block_size = block_size
        # NOTE: popped from the end, so low block ids are handed out first.
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._seqs: dict[int, _SeqBlocks] = {}

    # -- queries -------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def num_tokens(self, seq_id: int) -> int:
        seq = self._seqs.get(seq_id)
        return 0 if seq is None else seq.num_tokens

    def block_table(self, seq_id: int) -> list[int]:
        return self._seqs[seq_id].blocks

    def has(self, seq_id: int) -> bool:
        return seq_id in self._seqs

    def seq_ids(self) -> list[int]:
        return list(self._seqs)

    def blocks_needed(self, seq_id: int, start_pos: int, num_new: int) -> int:
        """Net new blocks a delta ``(start_pos, num_new)`` takes from the free pool."""
        have = len(self._seqs[seq_id].blocks) if seq_id in self._seqs else 0
        return max(0, -(-(start_pos + num_new) // self.block_size) - have)

    # -- updates -------------------------------------------------------------------------
    def truncate(self, seq_id: int, length: int) -> None:
        seq = self._seqs.get(seq_id)
        if seq is None:
            if length != 0:
                raise ValueError(f"sequence {seq_id} is unknown; cannot truncate to {length}")
            return
        if length > seq.num_tokens:
            raise ValueError(
                f"sequence {seq_id} holds {seq.num_tokens} tokens; cannot truncate to {length}"
            )
        keep = -(-length // self.block_size)
        while len(seq.blocks) > keep:
            self._free.append(seq.blocks.pop())
        seq.num_tokens = length

    def append(self, seq_id: int, num_new: int) -> list[int]:
        """Reserve ``num_new`` positions at the end of the sequence; return their flat slots."""
        seq = self._seqs.setdefault(seq_id, _SeqBlocks())
        start, end = seq.num_tokens, seq.num_tokens + num_new
        need = -(-end // self.block_size) - len(seq.blocks)
        if need > len(self._free):
            if not seq.blocks and seq.num_tokens == 0:
                del self._seqs[seq_id]
            raise KVCacheFull(
                f"KV cache full: sequence {seq_id} needs {need} more blocks, "
                f"{len(self._free)} free of {self.num_blocks}"
            )
        for _ in range(need):
            seq.blocks.append(self._free.pop())
        seq.num_tokens = end
        bs = self.block_size
        return [seq.blocks[p // bs] * bs + p % bs for p in range(start, end)]

    def free(self, seq_id: int) -> bool:
        seq = self._seqs.pop(seq_id, None)
        if seq is None:
            return False
        self._free.extend(reversed(seq.blocks))
        return True

    def free_all(self) -> None:
        for seq_id in list(self._seqs):
            self.free(seq_id)


def allocate_kv_caches(
    num_layers: int,
    num_blocks: int,
    block_size: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    return [
        (
            torch.zeros(shape, dtype=dtype, device=device),
            torch.zeros(shape, dtype=dtype, device=device),
        )
        for _ in range(num_layers)
    ]


def kv_bytes_per_block(
    num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * num_layers * block_size * num_kv_heads * head_dim * elem
