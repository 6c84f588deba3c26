"""Vocabulary-parallel embedding and LM head.

With TP the vocabulary is padded to a multiple of the TP size and split into contiguous row
ranges. The embedding looks up the ids it owns, zeroes the rest and all-reduces; the head
computes logits for its rows and all-gathers them into the full vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from outrider.kernels.fused import skinny_table
from outrider.workers.distributed import get_tp_group


class VocabParallelEmbedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        tp = get_tp_group()
        self.tp_rank, self.tp_size = tp.rank, tp.size
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.rows_per_rank = -(-num_embeddings // self.tp_size)
        self.vocab_start = self.tp_rank * self.rows_per_rank
        self.vocab_end = min(self.vocab_start + self.rows_per_rank, num_embeddings)
        self.weight = nn.Parameter(
            torch.empty(self.rows_per_rank, embedding_dim), requires_grad=False
        )
        self.weight.weight_loader = self.weight_loader

    def weight_loader(
        self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: object = None
    ) -> None:
        if loaded_weight.shape != (self.num_embeddings, self.embedding_dim):
            raise ValueError(
                f"shape mismatch: vocab weight {tuple(loaded_weight.shape)}, expected "
                f"{(self.num_embeddings, self.embedding_dim)}"
            )
        rows = self.vocab_end - self.vocab_start
        # NOTE: padding rows (past the real vocabulary) stay zero.
        param.data.zero_()
        param.data[:rows].copy_(loaded_weight[self.vocab_start : self.vocab_end])

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)  # [T, D]
        owned = (input_ids >= self.vocab_start) & (input_ids < self.vocab_end)  # [T]
        local_ids = torch.where(owned, input_ids - self.vocab_start, 0)
        out = F.embedding(local_ids, self.weight) * owned[:, None].to(self.weight.dtype)
        return get_tp_group().all_reduce(out)  # [T, D]


_SKINNY_ROWS = 2


class ParallelLMHead(VocabParallelEmbedding):
    def __init__(self, num_embeddings: int, embedding_dim: int, bias: bool = False) -> None:
        super().__init__(num_embeddings, embedding_dim)
        if bias:
            self.bias = nn.Parameter(torch.empty(self.rows_per_rank), requires_grad=False)
            self.bias.weight_loader = self._bias_loader
        else:
            self.register_parameter("bias", None)

    _weight_t: torch.Tensor | None = None

    def tie_weights(self, embed_tokens: VocabParallelEmbedding) -> None:
        """Share the embedding matrix (``tie_word_embeddings``); both must be on this stage."""
        self.weight = embed_tokens.weight

    def _bias_loader(
        self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: object = None
    ) -> None:
        param.data.zero_()
        rows = self.vocab_end - self.vocab_start
        param.data[:rows].copy_(loaded_weight[self.vocab_start : self.vocab_end])

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        cfg = skinny_table.plan(hidden_states, self.weight, "none")
        if cfg is not None:
            from outrider.kernels.fused import skinny_gemm as skinny  # NOTE: imports Triton

            logits = skinny.skinny_gemm(hidden_states, self.weight, self.bias, config=cfg)[0]
        elif hidden_states.shape[0] <= _SKINNY_ROWS and hidden_states.device.type == "cpu":
            logits = self._skinny_logits(hidden_states)  # [N, V_local]
        else:
            logits = F.linear(hidden_states, self.weight, self.bias)  # [N, V_local]
        if self.tp_size > 1:
            logits = get_tp_group().all_gather(logits, dim=-1)  # [N, V_padded]
        return logits[..., : self.num_embeddings]  # [N, V]

    def _skinny_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # NOTE: on CPU a [N, D] x [D, V] product with a row-major [D, V] copy is about twice as
        # fast as F.linear over [V, D] when N is tiny (decode at batch 1); the copy costs V*D.
        wt = self._weight_t
        if wt is None or wt.dtype != self.weight.dtype:
            wt = self._weight_t = self.weight.detach().t().contiguous()  # [D, V_local]
        logits = hidden_states @ wt
        return logits if self.bias is None else logits + self.bias

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("ParallelLMHead is used through compute_logits")
