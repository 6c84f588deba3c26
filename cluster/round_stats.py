"""Per-round timing and the engine's running totals (speculation, overlap, time split)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from outrider.cluster.sequence import SpecStats


@dataclass
class RoundTiming:
    """One round's wall time split into the groups' forward time and the rest (seconds)."""

    k: int = 0  # the longest draft of the round (0 = plain decoding)
    num_seqs: int = 0
    num_tokens: int = 0  # query tokens of the verify (deltas + drafts)
    wall_s: float = 0.0
    draft_s: float = 0.0  # drafter time (cold and ahead calls)
    verify_s: float = 0.0
    # NOTE: wall time minus the forward time on the critical path (calls that ran at the same
    # time count once).
    overhead_s: float = 0.0
    overlap_hits: int = 0
    overlap_misses: int = 0
    captured_graphs: bool = False  # a call captured CUDA graphs (one-off time in this round)


RECENT_ROUNDS = 8192


@dataclass
class EngineStats:
    spec: SpecStats = field(default_factory=SpecStats)
    num_rounds: int = 0
    num_generated_tokens: int = 0
    num_preemptions: int = 0
    rounds_by_k: dict[int, int] = field(default_factory=dict)
    num_overlap_hits: int = 0
    num_overlap_misses: int = 0
    wall_s: float = 0.0
    draft_s: float = 0.0
    verify_s: float = 0.0
    overhead_s: float = 0.0
    # the latest rounds (percentiles; one-off stalls stand out from the mean)
    recent: deque[RoundTiming] = field(default_factory=lambda: deque(maxlen=RECENT_ROUNDS))

    def record(self, t: RoundTiming) -> None:
        self.recent.append(t)
        self.rounds_by_k[t.k] = self.rounds_by_k.get(t.k, 0) + 1
        self.num_overlap_hits += t.overlap_hits
        self.num_overlap_misses += t.overlap_misses
        self.wall_s += t.wall_s
        self.draft_s += t.draft_s
        self.verify_s += t.verify_s
        self.overhead_s += t.overhead_s
