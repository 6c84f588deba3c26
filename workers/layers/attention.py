"""Attention layer: writes new K/V into the paged cache and attends through the chosen backend
(the rotary kernel may do the write: `forward_rotary`)."""

from __future__ import annotations

import os

import torch
from torch import nn

from outrider.kernels.attention.torch_ref import TorchAttentionBackend
from outrider.workers.forward_context import get_forward_context
from outrider.workers.layers.norm import RMSNorm
from outrider.workers.layers.rotary import RotaryEmbedding

_QK_NORM_IN_ROTARY = os.environ.get("OUTRIDER_QK_NORM_IN_ROTARY", "1") != "0"


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
        qk_norm: tuple[RMSNorm, RMSNorm] | None = None,
    ) -> torch.Tensor:
        """``forward(*rotary(positions, q, k), v)``. Where the fused rotary kernel runs and the
        backend's forward is the plain write-then-attend, that kernel also stores k and v in the
        paged cache (one launch fewer per layer) and the backend only attends; a backend with
        ``attend_rotary`` takes all three (the Triton one: in one launch at decode).
        ``qk_norm`` (Qwen3's per-head q and k RMSNorm) runs first, inside that launch where the
        weights fit it (``OUTRIDER_QK_NORM_IN_ROTARY=0``, read at import: never)."""
        ctx = get_forward_context()
        k_cache, v_cache = ctx.kv_caches[self.layer_idx]
        backend = ctx.attn_backend
        t = q.shape[0]
        if type(backend).forward is TorchAttentionBackend.forward and rotary.writes_kv(
            q, k, k_cache
        ):
            md = ctx.attn_metadata
            q_w = k_w = None
            eps = 1e-6
            if qk_norm is not None and _norms_fit(qk_norm, q, self.head_dim):
                q_w, k_w, eps = qk_norm[0].weight, qk_norm[1].weight, qk_norm[0].eps
            elif qk_norm is not None:
                q, k = self._qk_norm(q, k, qk_norm)
            if backend.attend_rotary is not None:
                out = backend.attend_rotary(
                    positions, q, k, v, rotary.cos_cache, rotary.sin_cache, k_cache, v_cache,
                    md, self.scale, q_norm_weight=q_w, k_norm_weight=k_w, eps=eps,
                )  # fmt: skip
                return out.reshape(t, self.num_heads * self.head_dim)
            q = rotary.forward_write_kv(
                positions, q, k, v, k_cache, v_cache, md.slot_mapping,
                q_norm_weight=q_w, k_norm_weight=k_w, eps=eps,
            )  # fmt: skip
            q3 = q.view(t, self.num_heads, self.head_dim)  # [T, nH, hd]
            out = backend.attend(q3, k_cache, v_cache, md, self.scale)
            return out.reshape(t, self.num_heads * self.head_dim)
        if qk_norm is not None:
            q, k = self._qk_norm(q, k, qk_norm)
        q, k = rotary(positions, q, k)
        return self(q, k, v)

    def _qk_norm(
        self, q: torch.Tensor, k: torch.Tensor, qk_norm: tuple[RMSNorm, RMSNorm]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        t, hd = q.shape[0], self.head_dim
        q_out = qk_norm[0](q.reshape(t, -1, hd))
        k_out = qk_norm[1](k.reshape(t, -1, hd))
        assert isinstance(q_out, torch.Tensor) and isinstance(k_out, torch.Tensor)
        return q_out.view(t, -1), k_out.view(t, -1)


def _norms_fit(qk_norm: tuple[RMSNorm, RMSNorm], q: torch.Tensor, head_dim: int) -> bool:
    """Whether the rotary launch can take these q/k RMSNorms (one eps, weights of the query's
    dtype and device, [head_dim] each)."""
    q_norm, k_norm = qk_norm
    return (
        _QK_NORM_IN_ROTARY
        and q_norm.eps == k_norm.eps
        and all(
            n.weight.shape == (head_dim,)
            and n.weight.dtype == q.dtype
            and n.weight.device == q.device
            for n in qk_norm
        )
    )
