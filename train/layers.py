"""Differentiable building blocks of the draft networks, named as speculators names them.

Attention takes an explicit boolean mask (True = may attend) over the concatenation of keys the
caller assembles, so one layer serves EAGLE-3's training-time test, P-EAGLE's parallel depths and
DFlash's blocks. Rotary tables come from outrider's inference RotaryEmbedding, so positions mean
the same thing in training and in serving.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from outrider.workers.layers.rotary import RotaryEmbedding


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def apply_rope(
    rope: RotaryEmbedding,
    x: torch.Tensor,  # [B, N, h, hd]
    positions: torch.Tensor,  # [B, N]
) -> torch.Tensor:
    cos = rope.cos_cache[positions].to(x.dtype)[:, :, None, :]  # [B, N, 1, hd/2]
    sin = rope.sin_cache[positions].to(x.dtype)[:, :, None, :]
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class SelfAttention(nn.Module):
    def __init__(
        self,
        in_features: int,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        qk_norm: bool,
        eps: float,
    ) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.q_proj = nn.Linear(in_features, num_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(in_features, num_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(in_features, num_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=False)
        self.q_norm = RMSNorm(head_dim, eps) if qk_norm else None
        self.k_norm = RMSNorm(head_dim, eps) if qk_norm else None

    def keys(
        self, x: torch.Tensor, positions: torch.Tensor, rope: RotaryEmbedding
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(K, V)`` [B, N, nKV, hd] of inputs x [B, N, in] at ``positions`` [B, N]."""
        b, n, _ = x.shape
        k = self.k_proj(x).view(b, n, self.num_kv_heads, self.head_dim)
        if self.k_norm is not None:
            k = self.k_norm(k)
        v = self.v_proj(x).view(b, n, self.num_kv_heads, self.head_dim)
        return apply_rope(rope, k, positions), v

    def forward(
        self,
        x: torch.Tensor,  # [B, N, in]
        positions: torch.Tensor,  # [B, N]
        rope: RotaryEmbedding,
        mask: torch.Tensor,  # [B or 1, N, M] bool over cat(past keys, own keys)
        past: Sequence[tuple[torch.Tensor, torch.Tensor]] = (),
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Attention output [B, N, H] and this call's own ``(K, V)`` (for later steps)."""
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, self.num_heads, self.head_dim)
        if self.q_norm is not None:
            q = self.q_norm(q)
        q = apply_rope(rope, q, positions)
        k, v = self.keys(x, positions, rope)
        ks = torch.cat([p[0] for p in past] + [k], dim=1)  # [B, M, nKV, hd]
        vs = torch.cat([p[1] for p in past] + [v], dim=1)
        rep = self.num_heads // self.num_kv_heads
        ks = ks.repeat_interleave(rep, dim=2).transpose(1, 2)  # [B, nH, M, hd]
        vs = vs.repeat_interleave(rep, dim=2).transpose(1, 2)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), ks, vs, attn_mask=mask[:, None])
        out = out.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim)
        return self.o_proj(out), (k, v)


class MLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """A pre-norm Llama/Qwen3 decoder layer (``first=True``: EAGLE-3's 2H-wide first layer)."""

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        eps: float,
        *,
        qk_norm: bool,
        first: bool = False,
    ) -> None:
        super().__init__()
        width = 2 * hidden_size if first else hidden_size
        self.input_layernorm = RMSNorm(hidden_size, eps)
        self.hidden_norm = RMSNorm(hidden_size, eps) if first else None
        self.self_attn = SelfAttention(
            width, hidden_size, num_heads, num_kv_heads, head_dim, qk_norm, eps
        )
        self.post_attention_layernorm = RMSNorm(hidden_size, eps)
        self.mlp = MLP(hidden_size, intermediate_size)

    def forward(
        self,
        x: torch.Tensor,  # [B, N, H]
        positions: torch.Tensor,  # [B, N]
        rope: RotaryEmbedding,
        mask: torch.Tensor,
        past: Sequence[tuple[torch.Tensor, torch.Tensor]] = (),
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        a, kv = self.self_attn(self.input_layernorm(x), positions, rope, mask, past)
        h = x + a
        return h + self.mlp(self.post_attention_layernorm(h)), kv
