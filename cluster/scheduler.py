"""Admission, KV budget and batch composition. Pure logic: no I/O, no tensors.

Every running sequence reserves the KV blocks its next round can touch (its tokens plus
``k + 1`` speculative positions) in each worker group. A waiting sequence is admitted while
both groups' reservations fit, the batch has room and the prefill token budget allows. When a
running sequence can no longer grow, the newest one is preempted: its KV is dropped and it
waits to be recomputed from its tokens.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from outrider.cluster.sequence import SeqStatus, Sequence


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class KVBudget:
    num_blocks: int
    block_size: int

    def blocks_for(self, num_tokens: int) -> int:
        return _ceil_div(num_tokens, self.block_size)


@dataclass
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def prefills(self) -> list[Sequence]:
        return [s for s in self.seqs if s.target_len == 0]

    @property
    def decodes(self) -> list[Sequence]:
        return [s for s in self.seqs if s.target_len > 0]


class Scheduler:
    def __init__(
        self,
        budgets: list[KVBudget],
        *,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        lookahead: int,
    ) -> None:
        self.budgets = budgets
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        # NOTE: tokens a round may add beyond a sequence's length: k drafts + 1 output.
        self.lookahead = lookahead
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def fits_alone(self, num_tokens: int) -> bool:
        return all(b.blocks_for(num_tokens + self.lookahead) <= b.num_blocks for b in self.budgets)

    def _reserved(self, budget: KVBudget, seqs: list[Sequence]) -> int:
        return sum(budget.blocks_for(len(s.token_ids) + self.lookahead) for s in seqs)

    def kv_usage(self) -> float:
        """Reserved fraction of the first (target) group's KV blocks."""
        b = self.budgets[0]
        return self._reserved(b, self.running) / max(b.num_blocks, 1)

    def _fits(self, seqs: list[Sequence]) -> bool:
        return all(self._reserved(b, seqs) <= b.num_blocks for b in self.budgets)

    def schedule(self) -> ScheduledBatch:
        out = ScheduledBatch()
        while self.running and not self._fits(self.running):
            victim = self.running.pop()
            # NOTE: the caller frees the victim's KV in both groups, then resets its cursors.
            victim.status = SeqStatus.WAITING
            self.waiting.appendleft(victim)
            out.preempted.append(victim)
        prefill_tokens = 0
        while self.waiting and len(self.running) < self.max_num_seqs:
            cand = self.waiting[0]
            n = len(cand.token_ids)
            if self.running and prefill_tokens + n > self.max_num_batched_tokens:
                break
            if not self._fits([*self.running, cand]):
                break
            self.waiting.popleft()
            cand.status = SeqStatus.RUNNING
            self.running.append(cand)
            prefill_tokens += n
        out.seqs = list(self.running)
        return out
