"""One request's state on the control plane: token ids, KV cursors, stop state, spec stats."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from outrider.workers.config import SamplingParams


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class SpecStats:
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)

    def record(self, num_draft: int, num_accepted: int) -> None:
        if num_draft == 0:
            return
        self.num_drafts += 1
        self.num_draft_tokens += num_draft
        self.num_accepted_tokens += num_accepted
        if len(self.accepted_per_position) < num_draft:
            self.accepted_per_position.extend([0] * (num_draft - len(self.accepted_per_position)))
        for i in range(num_accepted):
            self.accepted_per_position[i] += 1

    def merge(self, other: SpecStats) -> None:
        self.num_drafts += other.num_drafts
        self.num_draft_tokens += other.num_draft_tokens
        self.num_accepted_tokens += other.num_accepted_tokens
        n = len(other.accepted_per_position)
        if len(self.accepted_per_position) < n:
            self.accepted_per_position.extend([0] * (n - len(self.accepted_per_position)))
        for i, v in enumerate(other.accepted_per_position):
            self.accepted_per_position[i] += v

    @property
    def acceptance_length(self) -> float | None:
        """1 + accepted / drafts: tokens emitted per target pass while speculating."""
        if self.num_drafts == 0:
            return None
        return 1.0 + self.num_accepted_tokens / self.num_drafts

    @property
    def acceptance_rate(self) -> float | None:
        if self.num_draft_tokens == 0:
            return None
        return self.num_accepted_tokens / self.num_draft_tokens


@dataclass
class Sequence:
    seq_id: int
    prompt_token_ids: list[int]
    params: SamplingParams
    token_ids: list[int] = field(default_factory=list)
    status: SeqStatus = SeqStatus.WAITING
    finish_reason: str | None = None
    # NOTE: tokens [0, target_len) are confirmed in the target's KV; [0, draft_len) in the
    # drafter's. The next delta for each group starts at its cursor.
    target_len: int = 0
    draft_len: int = 0
    # Target hidden rows for token_ids[draft_len:] (see workers/protocol.py), opaque here.
    pending_hidden: object | None = None
    # With overlap: drafts for the next round, drafted while the target verified this one on the
    # assumption that every draft and the drafter's guess of the bonus token would be confirmed.
    prepared_draft_ids: list[int] | None = None
    prepared_draft_probs: object | None = None  # [n, V] q of the prepared drafts when sampled
    stats: SpecStats = field(default_factory=SpecStats)
    # detokenizer state
    text: str = ""
    prefix_offset: int = 0
    read_offset: int = 0
    stop_checked_len: int = 0
    text_emitted: int = 0  # characters of text already handed out as stream deltas

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)
        self.prefix_offset = max(len(self.prompt_token_ids) - 5, 0)
        self.read_offset = len(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SeqStatus.FINISHED
