"""Attention layer: writes new K/V into the paged cache and attends through the chosen backend."""

from __future__ import annotations

import torch
from torch import nn

from outrider.workers.forward_context import get_forward_context


class Attention(nn.Module):
    def __init__(
        self, num_heads: int, head_dim: int, num_kv_heads: int, scale: float, layer_idx: int
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.num_kv_heads = num_kv_heads
        self.scale = scale
        # NOTE: index into the runner's per-layer cache list (local to this pipeline stage).
        self.layer_idx = layer_idx

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        ctx = get_forward_context()
        t = q.shape[0]
        q = q.view(t, self.num_heads, self.head_dim)  # [T, nH, hd]
        k = k.view(t, self.num_kv_heads, self.head_dim)  # [T, nKV, hd]
        v = v.view(t, self.num_kv_heads, self.head_dim)
        k_cache, v_cache = ctx.kv_caches[self.layer_idx]
        out = ctx.attn_backend.forward(q, k, v, k_cache, v_cache, ctx.attn_metadata, self.scale)
        return out.reshape(t, self.num_heads * self.head_dim)
