"""Tensor- and pipeline-parallel groups of one worker group (torch.distributed inside it).

With no process group initialised every size is 1 and every collective is the identity, so
the same model files run in one process and under TP/PP.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class ParallelGroup:
    rank: int = 0
    size: int = 1
    group: dist.ProcessGroup | None = None
    ranks: tuple[int, ...] = (0,)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            return x
        dist.all_reduce(x, group=self.group)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=dim)


_TP = ParallelGroup()
_PP = ParallelGroup()


def get_tp_group() -> ParallelGroup:
    return _TP


def get_pp_group() -> ParallelGroup:
    return _PP


def set_parallel_groups(tp: ParallelGroup, pp: ParallelGroup) -> None:
    global _TP, _PP
    _TP, _PP = tp, pp


def init_parallel_groups(rank: int, tensor_parallel_size: int, pipeline_parallel_size: int) -> None:
    """Create TP and PP subgroups of an initialised default group.

    Ranks are laid out pipeline-major: rank = pp_rank * tp_size + tp_rank.
    """
    tp_size, pp_size = tensor_parallel_size, pipeline_parallel_size
    tp_rank, pp_rank = rank % tp_size, rank // tp_size
    tp_group = pp_group = None
    tp_ranks: tuple[int, ...] = (rank,)
    pp_ranks: tuple[int, ...] = (rank,)
    # NOTE: every rank must call new_group for every group, in the same order.
    for p in range(pp_size):
        ranks = tuple(p * tp_size + t for t in range(tp_size))
        g = dist.new_group(list(ranks)) if tp_size > 1 else None
        if p == pp_rank:
            tp_group, tp_ranks = g, ranks
    for t in range(tp_size):
        ranks = tuple(p * tp_size + t for p in range(pp_size))
        g = dist.new_group(list(ranks)) if pp_size > 1 else None
        if t == tp_rank:
            pp_group, pp_ranks = g, ranks
    set_parallel_groups(
        ParallelGroup(tp_rank, tp_size, tp_group, tp_ranks),
        ParallelGroup(pp_rank, pp_size, pp_group, pp_ranks),
    )
