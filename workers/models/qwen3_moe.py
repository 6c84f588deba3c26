"""Qwen3-MoE: Qwen3 attention (q/k norm) with sparse MoE blocks and no shared experts.

A layer is sparse when it is not in ``mlp_only_layers`` and ``(idx + 1) % decoder_sparse_step
== 0``; the other layers keep a dense MLP of ``intermediate_size``.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig

from outrider.workers.layers.linear import ReplicatedLinear
from outrider.workers.layers.moe import FusedMoE
from outrider.workers.models.llama import LlamaMLP, Qwen3ForCausalLM


def num_experts_of(config: PretrainedConfig) -> int:
    return int(getattr(config, "num_experts", None) or config.num_local_experts)


class Qwen3MoeSparseMoeBlock(nn.Module):
    def __init__(self, config: PretrainedConfig, moe_backend: str) -> None:
        super().__init__()
        num_experts = num_experts_of(config)
        self.gate = ReplicatedLinear(config.hidden_size, num_experts, bias=False)
        self.experts = FusedMoE(
            num_experts=num_experts,
            top_k=config.num_experts_per_tok,
            hidden_size=config.hidden_size,
            intermediate_size=config.moe_intermediate_size,
            renormalize=bool(config.norm_topk_prob),
            moe_backend=moe_backend,
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.experts.route_and_forward(hidden_states, self.gate)  # [T, H]


class Qwen3MoeForCausalLM(Qwen3ForCausalLM):
    def is_sparse_layer(self, layer_idx: int) -> bool:
        cfg = self.config
        step = getattr(cfg, "decoder_sparse_step", 1) or 1
        return (
            layer_idx not in (getattr(cfg, "mlp_only_layers", None) or [])
            and num_experts_of(cfg) > 0
            and (layer_idx + 1) % step == 0
        )

    def make_mlp(self, layer_idx: int) -> nn.Module:
        if self.is_sparse_layer(layer_idx):
            return Qwen3MoeSparseMoeBlock(self.config, self.moe_backend)
        return LlamaMLP(self.config.hidden_size, self.config.intermediate_size)
