"""Overlap bookkeeping: ahead deltas, hit/miss, drafter cursors (rollback), prepared drafts."""

from __future__ import annotations

import torch

from outrider.cluster.overlap import ahead_count, ahead_items_for, settle_ahead, take_prepared
from outrider.cluster.sequence import Sequence
from outrider.workers.config import SamplingParams
from outrider.workers.proposers.base import ProposeResult
from outrider.workers.verifier import VerifyResult


def _seq(seq_id: int, prompt: list[int], out: list[int], max_tokens: int = 50) -> Sequence:
    seq = Sequence(seq_id, prompt, SamplingParams(temperature=0, max_tokens=max_tokens))
    seq.token_ids += out
    seq.target_len = len(seq.token_ids) - 1
    return seq


def test_ahead_delta_assumes_every_draft_accepted() -> None:
    a = _seq(0, [1, 2, 3], [4])
    a.draft_len = 2  # the drafter is one confirmed token behind
    b = _seq(1, [5, 6], [])
    b.target_len = 0  # prefill round: no drafts, the whole prompt goes ahead with its params
    idx, items = ahead_items_for([a, b], [[7, 8, 9], []], 3, 100)
    assert idx == [0, 1]
    assert (items[0].delta.start_pos, items[0].delta.token_ids) == (2, [3, 4, 7, 8, 9])
    assert items[0].num_draft == 4 and items[0].params is None  # the bonus guess + k drafts
    assert (items[1].delta.start_pos, items[1].delta.token_ids) == (0, [5, 6])
    assert items[1].params is b.params
    assert ahead_items_for([a], [[7]], 0, 100) == ([], [])


def test_ahead_count_respects_max_tokens_and_max_model_len() -> None:
    seq = _seq(0, [1, 2, 3], [4, 5])  # 2 outputs, 5 tokens
    assert ahead_count(seq, 3, 3, 100) == 4
    seq.params = SamplingParams(max_tokens=8)  # after a hit: 6 outputs, room for 1 draft
    assert ahead_count(seq, 3, 3, 100) == 2
    seq.params = SamplingParams(max_tokens=7)  # nothing left to draft next round
    assert ahead_count(seq, 3, 3, 100) == 0
    assert ahead_count(_seq(1, [1, 2, 3], [4, 5]), 3, 3, 11) == 2  # 9 tokens + 1 of 11


def _settle(seq: Sequence, drafts: list[int], out: list[int], guess: list[int]) -> tuple[int, int]:
    lens = [len(seq.token_ids)]
    seq.token_ids += out
    n_acc = len(out) - 1
    q = torch.rand(len(guess), 4)
    ahead = ProposeResult([guess], [q])
    return settle_ahead([seq], lens, [drafts], VerifyResult([out], [n_acc]), [0], ahead)


def test_hit_keeps_the_prepared_drafts_and_their_q() -> None:
    seq = _seq(0, [1, 2, 3], [4])
    assert _settle(seq, [7, 8], [7, 8, 9], [9, 10, 11]) == (1, 0)
    assert seq.prepared_draft_ids == [10, 11]
    assert isinstance(seq.prepared_draft_probs, torch.Tensor)
    assert seq.prepared_draft_probs.shape == (2, 4)
    assert seq.draft_len == 6  # [1 2 3 4 7 8] were sent and are all confirmed; 9 is next


def test_wrong_guess_or_rejection_is_a_miss_and_rolls_the_drafter_back() -> None:
    seq = _seq(0, [1, 2, 3], [4])
    assert _settle(seq, [7, 8], [7, 8, 5], [9, 10, 11]) == (0, 1)  # bonus 5, guessed 9
    assert seq.prepared_draft_ids is None and seq.draft_len == 6
    seq = _seq(0, [1, 2, 3], [4])
    assert _settle(seq, [7, 8], [7, 6], [9, 10, 11]) == (0, 1)  # draft 8 rejected at 5
    assert seq.prepared_draft_ids is None and seq.draft_len == 5  # [1 2 3 4 7] still true


def test_take_prepared_cuts_to_k_and_never_reuses() -> None:
    a = _seq(0, [1, 2, 3], [4])
    a.prepared_draft_ids, a.prepared_draft_probs = [7, 8, 9], torch.rand(3, 4)
    b = _seq(1, [1, 2], [3])
    c = _seq(2, [1], [2])
    c.prepared_draft_ids = [5]
    drafts: list[list[int]] = [[], [], []]
    probs: list[torch.Tensor | None] = [None, None, None]
    cold = take_prepared([a, b, c], [2, 3, 0], drafts, probs)
    assert cold == [1] and drafts == [[7, 8], [], []]
    assert probs[0] is not None and probs[0].shape == (2, 4)
    assert a.prepared_draft_ids is None and c.prepared_draft_ids is None  # k = 0 drops them
