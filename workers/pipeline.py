"""Pipeline-parallel hand-offs inside one worker group (torch.distributed point-to-point).

Every rank of a group runs the same calls in lockstep (SPMD). A stage receives the previous
stage's residual stream and the aux hidden states captured so far, runs its layers and sends
them on; the last stage's final hidden states, aux states and logits are then broadcast to
every stage, so sampling and drafting logic runs identically on all ranks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from outrider.workers.distributed import ParallelGroup
from outrider.workers.models.base import IntermediateTensors, ModelOutput


def _empty(t: int, h: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.empty(t, h, dtype=dtype, device=device)


def recv_stage_input(
    pp: ParallelGroup,
    num_tokens: int,
    hidden_size: int,
    dtype: torch.dtype,
    device: torch.device,
    aux_ids_before: list[int],
) -> tuple[IntermediateTensors, dict[int, torch.Tensor]]:
    src = pp.ranks[pp.rank - 1]
    hidden = _empty(num_tokens, hidden_size, dtype, device)  # [T, H]
    residual = _empty(num_tokens, hidden_size, dtype, device)
    dist.recv(hidden, src=src)
    dist.recv(residual, src=src)
    aux: dict[int, torch.Tensor] = {}
    for i in aux_ids_before:
        aux[i] = _empty(num_tokens, hidden_size, dtype, device)
        dist.recv(aux[i], src=src)
    return IntermediateTensors(hidden, residual), aux


def send_stage_output(
    pp: ParallelGroup, out: ModelOutput, aux: dict[int, torch.Tensor], aux_ids: list[int]
) -> None:
    assert out.intermediate is not None
    dst = pp.ranks[pp.rank + 1]
    hidden = out.intermediate.hidden_states
    residual = out.intermediate.residual
    if residual is None:
        residual = torch.zeros_like(hidden)
    dist.send(hidden.contiguous(), dst=dst)
    dist.send(residual.contiguous(), dst=dst)
    for i in aux_ids:
        dist.send(aux[i].contiguous(), dst=dst)


def broadcast_from_last(pp: ParallelGroup, tensor: torch.Tensor) -> torch.Tensor:
    """Broadcast a tensor held by the last stage (pre-allocated elsewhere) to all stages."""
    dist.broadcast(tensor, src=pp.ranks[-1], group=pp.group)
    return tensor
