"""Target features for training, captured with outrider's own model runner.

A batch of token sequences is prefilled through the target's ModelRunner (the same paged-KV
forward the engine serves with), capturing the aux hidden states the drafter reads (id k = input
to layer k) and the target's logits. The logits are kept only on the draft vocabulary (the KL
target) plus the full-vocabulary argmax (to measure would-be acceptance).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from outrider.workers.protocol import Delta
from outrider.workers.runner import ModelRunner

_SEQ_ID_BASE = 1 << 40  # NOTE: ids far from the engine's, so a shared runner never collides.


@dataclass
class TargetBatch:
    """A padded batch: B sequences of at most T tokens."""

    input_ids: torch.Tensor  # [B, T] int64 (0 past the end)
    lengths: torch.Tensor  # [B] int64
    aux: torch.Tensor  # [B, T, A*H] the drafter's input features, ascending layer ids
    target_logits: torch.Tensor  # [B, T, Vd] float32: position p predicts token p+1
    target_argmax: torch.Tensor  # [B, T] int64 full-vocabulary greedy token at each position

    @property
    def valid(self) -> torch.Tensor:
        t = self.input_ids.shape[1]
        pos = torch.arange(t, device=self.lengths.device)
        return pos[None, :] < self.lengths[:, None]  # [B, T]


class TargetCapture:
    def __init__(
        self, runner: ModelRunner, aux_layer_ids: Sequence[int], kept: torch.Tensor
    ) -> None:
        self.runner = runner
        self.aux_layer_ids = tuple(sorted(set(aux_layer_ids)))
        self.kept = kept.to(runner.device)  # [Vd] target ids of the draft vocabulary
        self._next = 0

    @property
    def device(self) -> torch.device:
        return self.runner.device

    def max_tokens(self) -> int:
        """Tokens the runner's KV cache can hold at once."""
        return self.runner.num_blocks * self.runner.block_size

    def __call__(self, sequences: Sequence[Sequence[int]], out_device: torch.device) -> TargetBatch:
        lengths = [len(s) for s in sequences]
        if min(lengths, default=0) < 1:
            raise ValueError("every training sequence needs at least one token")
        deltas = []
        for s in sequences:
            deltas.append(Delta(_SEQ_ID_BASE + self._next, 0, [int(i) for i in s]))
            self._next += 1
        try:
            with torch.inference_mode():
                batch = self.runner.prepare(deltas)
                out = self.runner.forward(batch, aux_layer_ids=self.aux_layer_ids)
                assert out.hidden_states is not None
                logits = self.runner.compute_logits(out.hidden_states)  # [N, Vt]
                argmax = logits.argmax(dim=-1)  # [N]
                draft_logits = logits.index_select(1, self.kept)  # [N, Vd]
                aux = torch.cat([out.aux_hidden_states[i] for i in self.aux_layer_ids], dim=-1)
        finally:
            self.runner.release([d.seq_id for d in deltas])
        # NOTE: copies made outside inference mode, so autograd may save them for backward.
        b, t_max = len(sequences), max(lengths)
        res = TargetBatch(
            input_ids=torch.zeros(b, t_max, dtype=torch.int64, device=out_device),
            lengths=torch.tensor(lengths, dtype=torch.int64, device=out_device),
            aux=torch.zeros(b, t_max, aux.shape[-1], dtype=aux.dtype, device=out_device),
            target_logits=torch.zeros(
                b, t_max, draft_logits.shape[-1], dtype=torch.float32, device=out_device
            ),
            target_argmax=torch.zeros(b, t_max, dtype=torch.int64, device=out_device),
        )
        start = 0
        for i, n in enumerate(lengths):
            res.input_ids[i, :n] = torch.tensor(sequences[i], dtype=torch.int64)
            res.aux[i, :n] = aux[start : start + n]
            res.target_logits[i, :n] = draft_logits[start : start + n]
            res.target_argmax[i, :n] = argmax[start : start + n]
            start += n
        return res
