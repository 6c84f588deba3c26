"""Attention layer: writes new K/V into the paged cache and attends through the chosen backend
(the rotary kernel may do the write: `forward_rotary`)."""

from __future__ import annotations

import torch
from torch import nn

from outrider.kernels.attention.torch_ref import TorchAttentionBackend
from outrider.workers.forward_context import get_forward_context
from outrider.workers.layers.rotary import RotaryEmbedding


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

    def forward_rotary(
        self,
        positions: torch.Tensor,  # [T]
        q: torch.Tensor,  # [T, nH * hd]
        k: torch.Tensor,  # [T, nKV * hd]
        v: torch.Tensor,  # [T, nKV * hd]
        rotary: RotaryEmbedding,
    ) -> torch.Tensor:
        """``forward(*rotary(positions, q, k), v)``. Where the fused rotary kernel runs and the
        backend's forward is the plain write-then-attend, that kernel also stores k and v in the
        paged cache (one launch fewer per layer) and the backend only attends; a backend with
        ``attend_rotary`` takes all three (the Triton one: in one launch at decode)."""
        ctx = get_forward_context()
        k_cache, v_cache = ctx.kv_caches[self.layer_idx]
        backend = ctx.attn_backend
        if type(backend).forward is TorchAttentionBackend.forward and rotary.writes_kv(
            q, k, k_cache
        ):
            md = ctx.attn_metadata
            t = q.shape[0]
            if backend.attend_rotary is not None:
                out = backend.attend_rotary(
                    positions, q, k, v, rotary.cos_cache, rotary.sin_cache,
                    k_cache, v_cache, md, self.scale,
                )  # fmt: skip
                return out.reshape(t, self.num_heads * self.head_dim)
            q = rotary.forward_write_kv(positions, q, k, v, k_cache, v_cache, md.slot_mapping)
            q3 = q.view(t, self.num_heads, self.head_dim)  # [T, nH, hd]
            out = backend.attend(q3, k_cache, v_cache, md, self.scale)
            return out.reshape(t, self.num_heads * self.head_dim)
        q, k = rotary(positions, q, k)
        return self(q, k, v)
