"""The drafter side of a round: one interface for every speculative method.

A proposer receives, per sequence, a delta of confirmed tokens (plus the target's hidden-state
rows for them when it needs them) and the number of tokens to draft. It drafts either in
parallel (one forward for all k tokens) or sequentially (k forwards, one token each); every
proposer that can do the former can also do the latter with the same weights.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from outrider.workers.config import SamplingParams
from outrider.workers.protocol import Delta, DrafterCapabilities

DraftMode = Literal["parallel", "sequential"]


@dataclass
class ProposeItem:
    delta: Delta
    num_draft: int  # k for this sequence this round; 0 = only ingest the delta
    hidden_states: torch.Tensor | None = None  # [delta.num_hidden_rows, A*Ht]
    # NOTE: sent on a sequence's first call; decides greedy drafts vs sampled drafts + probs.
    params: SamplingParams | None = None


@dataclass
class ProposeResult:
    draft_token_ids: list[list[int]]
    # [k_b, V] per sequence when it drafts by sampling (probabilistic verification); else None
    draft_probs: list[torch.Tensor | None] = field(default_factory=list)
    forward_s: float = 0.0  # seconds the drafter spent in the call; set by whoever timed it
    captured_graphs: bool = False  # the call captured CUDA graphs (one-off time); set likewise


class Proposer(abc.ABC):
    method: str = ""

    @property
    @abc.abstractmethod
    def capabilities(self) -> DrafterCapabilities: ...

    @abc.abstractmethod
    def propose(self, items: Sequence[ProposeItem], mode: DraftMode) -> ProposeResult: ...

    @abc.abstractmethod
    def release(self, seq_ids: Sequence[int]) -> None: ...

    def kv_usage(self) -> dict[str, int]:
        return {}

    @property
    def num_graphs(self) -> int:
        """CUDA graphs captured so far (a call that adds some spent one-off time)."""
        return 0


def timed_propose(
    proposer: Proposer, items: Sequence[ProposeItem], mode: DraftMode
) -> ProposeResult:
    """``proposer.propose`` with the call's seconds in ``forward_s`` and whether it captured CUDA
    graphs in ``captured_graphs`` (what the round's timing and the draft-length policy read)."""
    t0 = time.perf_counter()
    num_graphs = proposer.num_graphs
    res = proposer.propose(items, mode)
    res.forward_s = res.forward_s or time.perf_counter() - t0
    res.captured_graphs = res.captured_graphs or proposer.num_graphs != num_graphs
    return res
