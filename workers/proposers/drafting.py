"""Choosing draft tokens from drafter logits: argmax, or a seeded sample plus its q."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from outrider.kernels.sampling.torch_ref import SamplingTensors, probs_for, sample_from_probs
from outrider.workers.config import SamplingParams

# NOTE: drafter generators are seeded apart from the target's so the two streams differ.
_DRAFT_SEED_SALT = 0x9E3779B97F4A7C15


class DraftSampler:
    """Per-sequence draft sampling state of one drafter worker."""

    def __init__(self, device: torch.device, *, draft_sampling: bool, vocab_size: int) -> None:
        self.device = device
        self.draft_sampling = draft_sampling
        self.vocab_size = vocab_size
        self._params: dict[int, SamplingParams] = {}
        self._generators: dict[int, torch.Generator] = {}

    def register(self, seq_id: int, params: SamplingParams | None) -> None:
        if params is None or seq_id in self._params:
            return
        self._params[seq_id] = params
        if params.seed is not None:
            gen = torch.Generator(device=self.device)
            gen.manual_seed((params.seed ^ _DRAFT_SEED_SALT) % 2**64)
            self._generators[seq_id] = gen

    def release(self, seq_id: int) -> None:
        self._params.pop(seq_id, None)
        self._generators.pop(seq_id, None)

    def samples(self, seq_id: int) -> bool:
        params = self._params.get(seq_id)
        return self.draft_sampling and params is not None and not params.greedy

    def pick(
        self,
        seq_ids: Sequence[int],
        logits: torch.Tensor,  # [B, V]
    ) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """Draft tokens [B] and, for sequences that draft by sampling, q rows [V]."""
        tokens = logits.argmax(dim=-1)  # [B]
        probs: list[torch.Tensor | None] = [None] * len(seq_ids)
        rows = [i for i, s in enumerate(seq_ids) if self.samples(s)]
        if not rows:
            return tokens, probs
        params = [self._params[seq_ids[i]] for i in rows]
        st = SamplingTensors.from_lists(
            [p.temperature for p in params],
            [p.top_k for p in params],
            [p.top_p for p in params],
            [self._generators.get(seq_ids[i]) for i in rows],
            logits.device,
            vocab_size=logits.shape[-1],
        )
        q = probs_for(logits[rows], st)  # [Br, V]
        drawn = sample_from_probs(q, st)  # [Br]
        for j, i in enumerate(rows):
            tokens[i] = drawn[j]
            row = q[j]
            if row.shape[0] < self.vocab_size:
                row = torch.nn.functional.pad(row, (0, self.vocab_size - row.shape[0]))
            probs[i] = row
        return tokens, probs
