"""FusedMoE layer: expert weights in the fused layout, routed through a registry MoE kernel.

Parameters: ``w13_weight [E, 2I, H]`` (each expert's gate rows above its up rows) and
``w2_weight [E, H, I]``. With TP every rank holds all experts and a slice of I; the partial
outputs are all-reduced. Checkpoint tensors arrive either per expert (HF ``gate_proj`` /
``up_proj`` / ``down_proj``, Mixtral ``w1`` / ``w3`` / ``w2``) or already stacked over experts
(transformers 5 ``experts.gate_up_proj [E, 2I, H]`` and ``experts.down_proj [E, H, I]``).
"""

from __future__ import annotations

import torch
from torch import nn

from outrider.kernels import registry
from outrider.kernels.moe.torch_ref import select_experts
from outrider.workers.distributed import get_tp_group
from outrider.workers.layers.linear import LinearBase

# checkpoint projection name -> shard id ("w1" gate, "w3" up, "w2" down)
EXPERT_SHARD_IDS: dict[str, str] = {
    "gate_proj": "w1",
    "up_proj": "w3",
    "down_proj": "w2",
    "w1": "w1",
    "w3": "w3",
    "w2": "w2",
}


class FusedMoE(nn.Module):
    def __init__(
        self,
        num_experts: int,
        top_k: int,
        hidden_size: int,
        intermediate_size: int,
        renormalize: bool,
        moe_backend: str = "torch",
    ) -> None:
        super().__init__()
        tp = get_tp_group()
        if intermediate_size % tp.size:
            raise ValueError(
                f"MoE intermediate size {intermediate_size} is not divisible by TP size {tp.size}"
            )
        self.tp_rank, self.tp_size = tp.rank, tp.size
        self.num_experts = num_experts
        self.top_k = top_k
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size // tp.size  # I, local
        self.renormalize = renormalize
        self.moe_backend = moe_backend
        self.kernel = registry.get("moe", moe_backend)
        # NOTE: routing is the torch reference unless the backend brings its own.
        self._select_experts = getattr(self.kernel, "select_experts", select_experts)
        # NOTE: a few tokens with their router in one backend call, where the backend has one.
        self._token_moe_applies = getattr(self.kernel, "token_moe_applies", None)
        inter = self.intermediate_size
        self.w13_weight = nn.Parameter(
            torch.empty(num_experts, 2 * inter, hidden_size), requires_grad=False
        )
        self.w2_weight = nn.Parameter(
            torch.empty(num_experts, hidden_size, inter), requires_grad=False
        )
        self.w13_weight.weight_loader = self.weight_loader
        self.w2_weight.weight_loader = self.weight_loader

    def _rows(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        return t.narrow(dim, self.tp_rank * self.intermediate_size, self.intermediate_size)

    def weight_loader(
        self,
        param: nn.Parameter,
        loaded_weight: torch.Tensor,
        shard_id: str,
        expert_id: int | None = None,
    ) -> None:
        """Load one expert's ``w1``/``w3``/``w2`` or, with ``expert_id=None``, every expert's
        stacked ``w13`` ([E, 2I, H], gate then up) or ``w2`` ([E, H, I])."""
        inter = self.intermediate_size
        if expert_id is None:
            if shard_id == "w13":
                gate, up = loaded_weight.chunk(2, dim=1)  # [E, I_total, H] each
                param.data[:, :inter].copy_(self._rows(gate, 1))
                param.data[:, inter:].copy_(self._rows(up, 1))
            elif shard_id == "w2":
                param.data.copy_(self._rows(loaded_weight, 2))
            else:
                raise ValueError(f"unknown stacked expert shard {shard_id!r}")
            return
        dst = param.data[expert_id]
        if shard_id == "w1":
            dst[:inter].copy_(self._rows(loaded_weight, 0))
        elif shard_id == "w3":
            dst[inter:].copy_(self._rows(loaded_weight, 0))
        elif shard_id == "w2":
            dst.copy_(self._rows(loaded_weight, 1))
        else:
            raise ValueError(f"unknown expert shard {shard_id!r}")

    def forward(
        self,
        hidden_states: torch.Tensor,  # [T, H]
        router_logits: torch.Tensor,  # [T, E]
    ) -> torch.Tensor:
        topk_weights, topk_ids = self._select_experts(
            router_logits, self.top_k, self.renormalize
        )  # [T, k] each
        out = self.kernel.fused_moe(
            hidden_states, self.w13_weight, self.w2_weight, topk_weights, topk_ids
        )  # [T, H]
        return self._all_reduce(out)

    def route_and_forward(self, hidden_states: torch.Tensor, gate: LinearBase) -> torch.Tensor:
        """``forward(hidden_states, gate(hidden_states))``; a few tokens take the backend's own
        path with the router inside (``token_moe``) where the backend has one for the call."""
        applies = self._token_moe_applies
        if (
            applies is not None
            and gate.bias is None
            and applies(hidden_states, gate.weight, self.w13_weight)
        ):
            out, _, _ = self.kernel.token_moe(
                hidden_states,
                gate.weight,
                self.w13_weight,
                self.w2_weight,
                self.top_k,
                self.renormalize,
            )  # [T, H]
            return self._all_reduce(out)
        return self(hidden_states, gate(hidden_states))

    def _all_reduce(self, out: torch.Tensor) -> torch.Tensor:
        return get_tp_group().all_reduce(out) if self.tp_size > 1 else out
