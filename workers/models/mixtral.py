"""Mixtral: Llama attention with a sparse MoE block in every layer.

Routing is softmax over the top-k router logits, i.e. softmax → top-k → renormalise. HF
checkpoints name the block ``block_sparse_moe`` with experts ``w1`` (gate), ``w3`` (up) and
``w2`` (down); outrider's layer calls it ``mlp`` like every other family.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig

from outrider.workers.layers.linear import ReplicatedLinear
from outrider.workers.layers.moe import FusedMoE
from outrider.workers.models.llama import LlamaForCausalLM


class MixtralSparseMoeBlock(nn.Module):
    def __init__(self, config: PretrainedConfig, moe_backend: str) -> None:
        super().__init__()
        self.gate = ReplicatedLinear(config.hidden_size, config.num_local_experts, bias=False)
        self.experts = FusedMoE(
            num_experts=config.num_local_experts,
            top_k=config.num_experts_per_tok,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            renormalize=True,
            moe_backend=moe_backend,
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.experts.route_and_forward(hidden_states, self.gate)  # [T, H]


class MixtralForCausalLM(LlamaForCausalLM):
    def attention_biases(self) -> tuple[bool, bool]:
        return False, False

    def make_mlp(self, layer_idx: int) -> nn.Module:
        return MixtralSparseMoeBlock(self.config, self.moe_backend)

    def remap_checkpoint_name(self, name: str) -> str:
        return name.replace(".block_sparse_moe.", ".mlp.")
