"""Llama-family decoder (Llama 3, SmolLM2, Mistral, Qwen2, Qwen3) and the shared causal-LM shell.

The families differ only in attention details: Qwen2 has a bias on q/k/v (not on o), Qwen3
normalises q and k per head before rotary, Llama follows ``attention_bias`` for all four.
MoE models subclass ``LlamaForCausalLM`` and replace ``make_mlp``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar

import torch
from torch import nn
from transformers import PretrainedConfig

from outrider.workers.layers.activation import SiluAndMul
from outrider.workers.layers.attention import Attention
from outrider.workers.layers.fused_linear import norm_linear, silu_mul_linear
from outrider.workers.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from outrider.workers.layers.norm import RMSNorm
from outrider.workers.layers.rotary import RotaryEmbedding, get_rope
from outrider.workers.layers.vocab import ParallelLMHead
from outrider.workers.models.base import (
    DecoderModel,
    IntermediateTensors,
    ModelOutput,
    stage_range,
)
from outrider.workers.models.weight_mapping import layer_index, load_routed, route, unexpected


def head_dim_of(config: PretrainedConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def reject_sliding_window(config: PretrainedConfig) -> None:
    if hasattr(config, "use_sliding_window"):
        uses = bool(config.use_sliding_window)
    else:
        uses = getattr(config, "sliding_window", None) is not None
    if uses:
        raise ValueError(f"{config.model_type}: sliding-window attention is not supported")


class LlamaMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(
            hidden_size, [intermediate_size, intermediate_size], bias=bias
        )
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, bias=bias)
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return silu_mul_linear(self.down_proj, self.act_fn, self.gate_up_proj(x))  # [T, H]

    def forward_normed(
        self, x: torch.Tensor, residual: torch.Tensor | None, norm: RMSNorm
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(forward(norm(x + residual)), x + residual)``, the norm fused where it pays."""
        gate_up, residual = norm_linear(norm, self.gate_up_proj, x, residual)  # [T, 2I]
        return silu_mul_linear(self.down_proj, self.act_fn, gate_up), residual


class LlamaAttention(nn.Module):
    def __init__(
        self,
        config: PretrainedConfig,
        local_idx: int,
        rotary_emb: RotaryEmbedding,
        qkv_bias: bool,
        o_bias: bool,
        qk_norm: bool,
    ) -> None:
        super().__init__()
        self.head_dim = head_dim_of(config)
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size,
            self.head_dim,
            config.num_attention_heads,
            config.num_key_value_heads,
            bias=qkv_bias,
        )
        self.q_size, self.kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size
        self.o_proj = RowParallelLinear(
            config.num_attention_heads * self.head_dim, config.hidden_size, bias=o_bias
        )
        self.rotary_emb = rotary_emb
        if qk_norm:
            self.q_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.qk_norm = qk_norm
        self.attn = Attention(
            self.qkv_proj.num_heads,
            self.head_dim,
            self.qkv_proj.num_kv_heads,
            scale=self.head_dim**-0.5,
            layer_idx=local_idx,
        )

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        return self._attend(positions, self.qkv_proj(hidden_states))

    def forward_normed(
        self,
        positions: torch.Tensor,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        norm: RMSNorm,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(forward(norm(x + residual)), x + residual)``, the norm fused where it pays."""
        qkv, residual = norm_linear(norm, self.qkv_proj, x, residual)
        return self._attend(positions, qkv), residual

    def _attend(self, positions: torch.Tensor, qkv: torch.Tensor) -> torch.Tensor:
        """q/k norm, rotary, attention and o_proj of ``qkv [T, (nH + 2 nKV) hd]``."""
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        qk_norm = (self.q_norm, self.k_norm) if self.qk_norm else None
        out = self.attn.forward_rotary(positions, q, k, v, self.rotary_emb, qk_norm)
        return self.o_proj(out)  # [T, H]


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: PretrainedConfig, self_attn: LlamaAttention, mlp: nn.Module):
        super().__init__()
        self.self_attn = self_attn
        self.mlp = mlp
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        positions: torch.Tensor,  # [T]
        hidden_states: torch.Tensor,  # [T, H]
        residual: torch.Tensor | None,  # [T, H]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        hidden_states, residual = self.self_attn.forward_normed(
            positions, hidden_states, residual, self.input_layernorm
        )
        if isinstance(self.mlp, LlamaMLP):
            return self.mlp.forward_normed(hidden_states, residual, self.post_attention_layernorm)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


class LlamaForCausalLM(nn.Module):
    """Decoder-only causal LM for one pipeline stage; see ``models.base`` for the contract."""

    qk_norm: ClassVar[bool] = False

    def __init__(
        self,
        config: PretrainedConfig,
        *,
        moe_backend: str = "torch",
        start_layer: int = 0,
        end_layer: int | None = None,
    ) -> None:
        super().__init__()
        reject_sliding_window(config)
        self.config = config
        self.moe_backend = moe_backend
        self.start_layer, self.end_layer = stage_range(
            config.num_hidden_layers, start_layer, end_layer
        )
        self.rotary_emb = get_rope(head_dim_of(config), config.max_position_embeddings, config)
        self.model = DecoderModel(
            config.vocab_size,
            config.hidden_size,
            config.num_hidden_layers,
            config.rms_norm_eps,
            self.start_layer,
            self.end_layer,
            self.make_layer,
        )
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        self.lm_head: ParallelLMHead | None = None
        if self.model.is_last:
            self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)
            if self.tie_word_embeddings and self.model.is_first:
                self.lm_head.tie_weights(self.model.embed_tokens)

    def attention_biases(self) -> tuple[bool, bool]:
        """``(qkv_bias, o_bias)``."""
        bias = bool(getattr(self.config, "attention_bias", False))
        return bias, bias

    def make_mlp(self, layer_idx: int) -> nn.Module:
        cfg = self.config
        return LlamaMLP(cfg.hidden_size, cfg.intermediate_size, getattr(cfg, "mlp_bias", False))

    def make_layer(self, layer_idx: int, local_idx: int) -> nn.Module:
        qkv_bias, o_bias = self.attention_biases()
        attn = LlamaAttention(
            self.config, local_idx, self.rotary_emb, qkv_bias, o_bias, self.qk_norm
        )
        return LlamaDecoderLayer(self.config, attn, self.make_mlp(layer_idx))

    def remap_checkpoint_name(self, name: str) -> str:
        return name

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.model.embed_tokens is None:
            raise RuntimeError("embed_input_ids runs on the first pipeline stage only")
        return self.model.embed_tokens(input_ids)  # [T, H]

    def forward(
        self,
        input_ids: torch.Tensor | None,  # [T]
        positions: torch.Tensor,  # [T]
        intermediate: IntermediateTensors | None = None,
        aux_layer_ids: tuple[int, ...] = (),
    ) -> ModelOutput:
        return self.model(input_ids, positions, intermediate, aux_layer_ids)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.lm_head is None:
            raise RuntimeError("compute_logits runs on the last pipeline stage only")
        return self.lm_head.compute_logits(hidden_states)  # [N, V]

    def _checkpoint_target(self, name: str) -> str | None:
        """Where a checkpoint tensor goes on this stage (None: another stage owns it)."""
        if "rotary_emb.inv_freq" in name:
            return None
        layer = layer_index(name)
        if layer is not None:
            return name if self.start_layer <= layer < self.end_layer else None
        if name.startswith("lm_head."):
            return None if self.lm_head is None or self.tie_word_embeddings else name
        if name.startswith("model.embed_tokens."):
            if self.model.is_first:
                return name
            # NOTE: tied weights on a last stage without the embedding feed the head directly.
            tied_head = self.lm_head is not None and self.tie_word_embeddings
            return name.replace("model.embed_tokens.", "lm_head.") if tied_head else None
        if name.startswith("model.norm."):
            return name if self.model.is_last else None
        return name

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load HF-named tensors; returns the names of the parameters that received data."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        unknown: set[str] = set()
        for ckpt_name, weight in weights:
            name = self._checkpoint_target(self.remap_checkpoint_name(ckpt_name))
            if name is None:
                continue
            routed = route(name)
            if routed.param_name not in params:
                unknown.add(ckpt_name)
                continue
            load_routed(params, routed, weight)
            loaded.add(routed.param_name)
        if unknown:
            raise ValueError(
                f"checkpoint tensors with no matching parameter: {unexpected(unknown)}"
            )
        return loaded


class MistralForCausalLM(LlamaForCausalLM):
    pass


class Qwen2ForCausalLM(LlamaForCausalLM):
    def attention_biases(self) -> tuple[bool, bool]:
        return True, False


class Qwen3ForCausalLM(LlamaForCausalLM):
    qk_norm = True
