"""Floors of GPU steps: the bytes that must move and the FLOPs that must run, per model shape.

A step's floor is ``max(bytes / bandwidth, FLOPs / matmul rate)``. Bytes count every weight the
step reads once (for a MoE layer only the experts its tokens are routed to), every cached key
and value it attends over, and its activations in and out; FLOPs count the matmuls (2 per
multiply-add) including attention's QK and PV. ``outrider bench-kernels`` prints measured
times against these.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ModelShape:
    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    num_experts: int = 0  # 0: dense MLP in every layer
    top_k: int = 0
    moe_intermediate_size: int = 0
    qk_norm: bool = False

    @classmethod
    def from_config(cls, name: str, cfg: dict[str, Any]) -> ModelShape:
        heads = int(cfg["num_attention_heads"])
        return cls(
            name=name,
            hidden_size=int(cfg["hidden_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or cfg["hidden_size"] // heads),
            intermediate_size=int(cfg["intermediate_size"]),
            vocab_size=int(cfg["vocab_size"]),
            num_experts=int(cfg.get("num_experts") or cfg.get("num_local_experts") or 0),
            top_k=int(cfg.get("num_experts_per_tok") or 0),
            moe_intermediate_size=int(cfg.get("moe_intermediate_size") or 0),
            qk_norm=cfg["model_type"] in ("qwen3", "qwen3_moe"),
        )

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def attn_params(self) -> int:
        """QKV and O projections (+ q/k norms) of one layer."""
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        norms = 2 * self.head_dim if self.qk_norm else 0
        return self.hidden_size * (q + 2 * kv) + q * self.hidden_size + norms

    @property
    def expert_params(self) -> int:
        return 3 * self.hidden_size * self.moe_intermediate_size

    @property
    def router_params(self) -> int:
        return self.hidden_size * self.num_experts

    @property
    def mlp_params(self) -> int:
        """All MLP weights of one layer (every expert for a MoE layer)."""
        if self.is_moe:
            return self.router_params + self.num_experts * self.expert_params
        return 3 * self.hidden_size * self.intermediate_size

    @property
    def layer_params(self) -> int:
        return self.attn_params + self.mlp_params + 2 * self.hidden_size

    @property
    def num_params(self) -> int:
        """Embedding + layers + final norm + (untied) LM head."""
        embed = self.vocab_size * self.hidden_size
        return 2 * embed + self.num_layers * self.layer_params + self.hidden_size


@dataclass(frozen=True)
class Cost:
    """Bytes that must move and FLOPs that must run for one timed op."""

    bytes: float
    flops: float

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.bytes + other.bytes, self.flops + other.flops)

    def scaled(self, n: float) -> Cost:
        return Cost(self.bytes * n, self.flops * n)

    def floor_s(self, bandwidth: float, matmul_rate: float) -> float:
        return max(self.bytes / bandwidth, self.flops / matmul_rate)

    def bound(self, bandwidth: float, matmul_rate: float) -> str:
        return "memory" if self.bytes / bandwidth >= self.flops / matmul_rate else "compute"


def expected_active_experts(num_experts: int, top_k: int, num_tokens: int) -> float:
    """Experts hit by ``num_tokens`` tokens routed uniformly at random (top-k each)."""
    if num_experts == 0 or num_tokens == 0:
        return 0.0
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** num_tokens)


def attention_cost(shape: ModelShape, batch: int, context: int, q: int, elt: int) -> Cost:
    """One layer: new K/V written, every cached K/V read once, q read and the output written;
    query i of a sequence sees ``context + i + 1`` keys (QK and PV: 4 FLOPs per head dim)."""
    kv_row = shape.num_kv_heads * shape.head_dim
    q_row = shape.num_heads * shape.head_dim
    tokens = batch * q
    kv_read = 2 * batch * (context + q) * kv_row * elt
    io = tokens * (2 * q_row + 2 * kv_row) * elt
    keys_seen = batch * sum(context + i + 1 for i in range(q))
    return Cost(kv_read + io, 4.0 * shape.num_heads * shape.head_dim * keys_seen)


def moe_cost(shape: ModelShape, num_tokens: int, active_experts: float, elt: int) -> Cost:
    """Router + the weights of every expert hit (read once) + tokens in and out."""
    weights = (active_experts * shape.expert_params + shape.router_params) * elt
    io = 2 * num_tokens * shape.hidden_size * elt
    flops = 2.0 * num_tokens * (shape.top_k * shape.expert_params + shape.router_params)
    return Cost(weights + io, flops)


def layer_cost(
    shape: ModelShape, batch: int, context: int, q: int, elt: int, active_experts: float = 0.0
) -> Cost:
    tokens = batch * q
    dense = shape.attn_params + 2 * shape.hidden_size
    cost = Cost(dense * elt + 2 * tokens * shape.hidden_size * elt, 2.0 * tokens * dense)
    cost = cost + attention_cost(shape, batch, context, q, elt)
    if shape.is_moe:
        return cost + moe_cost(shape, tokens, active_experts, elt)
    mlp = shape.mlp_params
    return cost + Cost(mlp * elt, 2.0 * tokens * mlp)


def model_cost(
    shape: ModelShape, batch: int, context: int, q: int, elt: int, active_experts: float = 0.0
) -> Cost:
    """Every layer, the embedding rows, the final norm and the LM head over every token."""
    tokens = batch * q
    head = shape.vocab_size * shape.hidden_size
    edges = Cost(
        (head + shape.hidden_size + tokens * shape.hidden_size + tokens * shape.vocab_size) * elt,
        2.0 * tokens * head,
    )
    layers = layer_cost(shape, batch, context, q, elt, active_experts).scaled(shape.num_layers)
    return layers + edges
