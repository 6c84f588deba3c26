"""Per-forward attention metadata shared by every attention backend."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class AttentionMetadata:
    """Describes one batch of sequences over a paged KV cache.

    Tokens of all sequences are packed along one axis (T = total new tokens). Sequence b owns
    query tokens ``query_start_loc[b]:query_start_loc[b + 1]``; they sit at the *last*
    ``query_len`` positions of its ``seq_lens[b]`` cached tokens (their K/V included).
    """

    slot_mapping: torch.Tensor  # [T] int64, flat cache slot of each new token; -1 = not written
    query_start_loc: torch.Tensor  # [B + 1] int64
    seq_lens: torch.Tensor  # [B] int64, cached tokens after this step's writes
    block_tables: torch.Tensor  # [B, max_blocks] int64, padded with 0
    max_query_len: int
    max_seq_len: int
    # NOTE: causal=False is the masked block (DFlash): every query sees all seq_lens[b] keys.
    causal: bool = True
    # Host copies for backends that plan on the CPU (kept to avoid device syncs).
    query_lens_cpu: list[int] = field(default_factory=list)
    seq_lens_cpu: list[int] = field(default_factory=list)
    # Backend-private state computed once per forward and reused by every layer.
    backend_state: dict[str, Any] = field(default_factory=dict)

    @property
    def num_seqs(self) -> int:
        return int(self.seq_lens.shape[0])
