"""Messages between the control plane and a worker group: the unit of work is a delta.

A delta ``(seq_id, start_pos, token_ids)`` tells a worker that sequence ``seq_id`` holds
``token_ids`` from position ``start_pos`` on. The worker first truncates that sequence's KV to
``start_pos`` and then appends, so rollback after a rejection is implicit and retries are
idempotent. Hidden-state rows that travel with a drafter delta are aligned to its tokens: the row
for the token at position p is the target's hidden state at position p - 1 (the one that
produced it); the token at position 0 has none.
"""

from __future__ import annotations

import msgspec


class Delta(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, frozen=True):
    seq_id: int
    start_pos: int
    token_ids: list[int]

    @property
    def end_pos(self) -> int:
        return self.start_pos + len(self.token_ids)

    @property
    def num_hidden_rows(self) -> int:
        """Target hidden-state rows that pair with this delta's tokens (none for position 0)."""
        return len(self.token_ids) - (1 if self.start_pos == 0 else 0)
