"""Overlap: the drafter drafts round r + 1 while the target verifies round r.

For each sequence the ahead call sends the delta ``tokens[draft_len:] + drafts_r`` (every draft
of round r assumed accepted) and asks for ``1 + k`` tokens: the first is the drafter's guess of
round r's bonus token, the other k are round r + 1's drafts. After verification:

- hit (all k drafts accepted and the bonus equals the guess): the k drafts are round r + 1's,
  used at once, so that round calls the drafter only for the drafts of r + 2;
- miss: they are dropped and round r + 1 drafts from the true state first (a "cold" propose).

Either way the drafter's cursor moves to the first position it was sent a wrong token for
(``len(tokens before r) + num_accepted``): its next delta truncates its KV there (rollback).
"""

from __future__ import annotations

import torch

from outrider.cluster.sequence import Sequence
from outrider.workers.proposers.base import ProposeItem, ProposeResult
from outrider.workers.protocol import Delta
from outrider.workers.verifier import VerifyResult


def take_prepared(
    seqs: list[Sequence],
    ks: list[int],
    drafts: list[list[int]],
    probs: list[torch.Tensor | None],
) -> list[int]:
    """Use (cut to this round's k) the drafts prepared last round; return the indices of the
    sequences that must draft before verifying. Prepared drafts never outlive one round."""
    cold = []
    for i, seq in enumerate(seqs):
        prepared, prepared_probs = seq.prepared_draft_ids, seq.prepared_draft_probs
        seq.prepared_draft_ids = seq.prepared_draft_probs = None
        if ks[i] == 0:
            continue
        if prepared:
            drafts[i] = prepared[: ks[i]]
            if isinstance(prepared_probs, torch.Tensor):
                probs[i] = prepared_probs[: len(drafts[i])]  # [n, V]
        else:
            cold.append(i)
    return cold


def ahead_count(seq: Sequence, num_drafts: int, k: int, max_model_len: int) -> int:
    """Tokens to draft ahead (the bonus guess + next round's drafts); 0 when none would fit."""
    outputs = seq.num_output_tokens + num_drafts + 1  # if every draft and the guess hold
    room_tokens = seq.params.max_tokens - outputs - 1
    room_len = max_model_len - (len(seq.token_ids) + num_drafts + 1) - 1
    room = min(k, room_tokens, room_len)
    return 1 + room if room > 0 else 0


def ahead_items_for(
    seqs: list[Sequence], drafts: list[list[int]], k: int, max_model_len: int
) -> tuple[list[int], list[ProposeItem]]:
    """Propose items drafting round r + 1 from [confirmed tokens, drafts of round r]."""
    idx: list[int] = []
    items: list[ProposeItem] = []
    if k == 0:
        return idx, items
    for i, seq in enumerate(seqs):
        n = ahead_count(seq, len(drafts[i]), k, max_model_len)
        tokens = seq.token_ids[seq.draft_len :] + drafts[i]
        if n == 0 or not tokens:
            continue
        delta = Delta(seq.seq_id, seq.draft_len, tokens)
        items.append(ProposeItem(delta, n, None, seq.params if seq.draft_len == 0 else None))
        idx.append(i)
    return idx, items


def settle_ahead(
    seqs: list[Sequence],
    lens: list[int],
    drafts: list[list[int]],
    result: VerifyResult,
    idx: list[int],
    ahead: ProposeResult,
) -> tuple[int, int]:
    """Keep the prepared drafts of the hits, move the drafter cursors; (hits, misses).

    ``lens`` are the sequences' lengths before this round's tokens were appended.
    """
    hits = misses = 0
    for j, i in enumerate(idx):
        seq = seqs[i]
        if seq.is_finished:
            continue
        n_acc = result.num_accepted[i]
        guess = ahead.draft_token_ids[j]
        new = seq.token_ids[lens[i] :]
        hit = (
            n_acc == len(drafts[i])
            and len(guess) > 1
            and len(new) == n_acc + 1
            and new[-1] == guess[0]
        )
        # NOTE: the drafter holds the delta tokens it was sent; those before the first rejected
        # draft are true, so its next delta starts right after them.
        seq.draft_len = lens[i] + n_acc
        if hit:
            seq.prepared_draft_ids = guess[1:]
            q = ahead.draft_probs[j] if ahead.draft_probs else None
            seq.prepared_draft_probs = q[1:] if q is not None else None  # [k, V]
            hits += 1
        else:
            misses += 1
    return hits, misses
