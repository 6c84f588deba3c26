"""Reduced draft vocabulary from token frequency, with speculators' d2t / t2d tensors.

The ``Vd`` most frequent target ids are kept and sorted ascending; draft id ``i`` is the i-th
smallest kept id, so ``d2t[i] = kept[i] - i`` (offsets, non-decreasing) and ``t2d`` marks the kept
ids. Ids that never occur fill up the set from 0 upwards when fewer than ``Vd`` ids were seen.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DraftVocab:
    kept: torch.Tensor  # [Vd] int64, ascending target ids
    vocab_size: int  # Vt

    @property
    def draft_vocab_size(self) -> int:
        return int(self.kept.numel())

    @property
    def d2t(self) -> torch.Tensor:
        return self.kept - torch.arange(self.kept.numel(), dtype=torch.int64)  # [Vd]

    @property
    def t2d(self) -> torch.Tensor:
        mask = torch.zeros(self.vocab_size, dtype=torch.bool)  # [Vt]
        mask[self.kept] = True
        return mask

    def coverage(self, counts: torch.Tensor) -> float:
        """Fraction of the counted tokens that the draft vocabulary contains."""
        total = float(counts.sum())
        return float(counts[self.kept].sum()) / total if total > 0 else 0.0


def count_tokens(sequences: list[list[int]], vocab_size: int) -> torch.Tensor:
    counts = torch.zeros(vocab_size, dtype=torch.int64)  # [Vt]
    for ids in sequences:
        if ids:
            counts += torch.bincount(torch.tensor(ids, dtype=torch.int64), minlength=vocab_size)
    return counts


def build_draft_vocab(counts: torch.Tensor, draft_vocab_size: int) -> DraftVocab:
    vocab_size = int(counts.numel())
    if not 1 <= draft_vocab_size <= vocab_size:
        raise ValueError(
            f"`draft_vocab_size` must be in [1, {vocab_size}] for this target, "
            f"got {draft_vocab_size}"
        )
    # NOTE: stable order among equal counts (lower ids first), so the choice is deterministic.
    order = torch.sort(-counts, stable=True).indices
    seen = int((counts > 0).sum())
    top = order[: min(seen, draft_vocab_size)]
    if top.numel() < draft_vocab_size:
        rest = torch.ones(vocab_size, dtype=torch.bool)
        rest[top] = False
        fill = torch.nonzero(rest).flatten()[: draft_vocab_size - top.numel()]
        top = torch.cat([top, fill])
    kept = torch.sort(top).values.to(torch.int64)
    return DraftVocab(kept=kept, vocab_size=vocab_size)
