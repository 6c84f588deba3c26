"""Rotary position embedding (NeoX / HF layout: the two halves of each head rotate together).

Supported rope types: ``default`` and ``linear`` (plain theta, optionally position-scaled) and
``llama3`` (Llama 3.1 frequency smoothing). Config attributes are read in both shapes:
transformers 4 (``rope_theta`` + ``rope_scaling``) and transformers 5 (``rope_parameters``).
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
from torch import nn

from outrider.kernels.fused.dispatch import use_fused

_SUPPORTED = ("default", "linear", "llama3")


def rope_config(config: Any) -> tuple[float, dict[str, Any]]:
    """Return ``(rope_theta, scaling)``; ``scaling["rope_type"]`` is always set."""
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and "rope_theta" in params:
        theta = float(params["rope_theta"])
        scaling = dict(params)
    else:
        theta = float(getattr(config, "rope_theta", None) or 10000.0)
        scaling = dict(getattr(config, "rope_scaling", None) or {})
    rope_type = scaling.get("rope_type") or scaling.get("type") or "default"
    scaling["rope_type"] = rope_type
    if rope_type not in _SUPPORTED:
        raise ValueError(
            f"rope type {rope_type!r} is not supported; supported: {', '.join(_SUPPORTED)}"
        )
    return theta, scaling


def _inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim
    return 1.0 / (theta**exponents)  # [hd/2] float32


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Precomputed cos/sin table over ``max_position`` positions, shared by all layers."""

    def __init__(self, head_dim: int, max_position: int, theta: float, scaling: dict[str, Any]):
        super().__init__()
        self.head_dim = head_dim
        self.max_position = max_position
        inv_freq = _inv_freq(head_dim, theta)
        rope_type = scaling["rope_type"]
        if rope_type == "llama3":
            inv_freq = _llama3_inv_freq(inv_freq, scaling)
        elif rope_type == "linear":
            inv_freq = inv_freq / float(scaling["factor"])
        # NOTE: the table is float32, as in HF and vLLM, whatever the model dtype.
        positions = torch.arange(max_position, dtype=torch.int64).to(torch.float32)
        freqs = positions[:, None] * inv_freq[None, :]  # [P, hd/2]
        self.register_buffer("cos_cache", freqs.cos(), persistent=False)
        self.register_buffer("sin_cache", freqs.sin(), persistent=False)
        # NOTE: every layer of a forward passes the same positions tensor; cos/sin are looked
        # up once per forward and reused (identity check on the tensor we hold).
        self._memo: tuple[torch.Tensor, torch.dtype, torch.Tensor, torch.Tensor] | None = None
        # NOTE: read once, as the other kernel switches are: writes_kv runs per layer.
        self._write_kv_on = os.environ.get("OUTRIDER_ROTARY_WRITES_KV", "1") != "0"

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        t = x.shape[0]
        x = x.view(t, -1, self.head_dim)  # [T, nH, hd]
        x1, x2 = x.chunk(2, dim=-1)
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        return out.view(t, -1)

    def _fused(self, query: torch.Tensor, key: torch.Tensor) -> bool:
        return (
            use_fused(query)
            and query.dim() == 2
            and key.dim() == 2
            and key.dtype == query.dtype
            and self.cos_cache.device == query.device
        )

    def writes_kv(self, query: torch.Tensor, key: torch.Tensor, k_cache: torch.Tensor) -> bool:
        """Whether ``forward_write_kv`` runs as one fused launch here (host-side checks);
        ``OUTRIDER_ROTARY_WRITES_KV=0`` (read at construction) leaves the write to the attention
        backend."""
        return (
            self._write_kv_on
            and self._fused(query, key)
            and k_cache.device == query.device
            and k_cache.dim() == 4
            and k_cache.stride(-1) == 1
        )

    def forward_write_kv(
        self,
        positions: torch.Tensor,  # [T]
        query: torch.Tensor,  # [T, nH * hd]
        key: torch.Tensor,  # [T, nKV * hd]
        value: torch.Tensor,  # [T, nKV * hd]
        k_cache: torch.Tensor,  # [N, bs, nKV, hd]
        v_cache: torch.Tensor,  # [N, bs, nKV, hd]
        slot_mapping: torch.Tensor,  # [T]; < 0 = not written
        *,
        q_norm_weight: torch.Tensor | None = None,  # [hd]
        k_norm_weight: torch.Tensor | None = None,  # [hd]
        eps: float = 1e-6,
    ) -> torch.Tensor:
        """The rotated query; the rotated key and the value go to their cache slots, as the
        attention backends' ``write_kv`` stores them (one Triton launch; ``writes_kv``). With
        the q/k RMSNorm weights, each head is normalised first (``apply_rotary_write_kv``)."""
        from outrider.kernels.fused.rotary import apply_rotary_write_kv

        return apply_rotary_write_kv(
            positions, query, key, value, self.cos_cache, self.sin_cache, k_cache, v_cache,
            slot_mapping.to(query.device),
            q_norm_weight=q_norm_weight, k_norm_weight=k_norm_weight, eps=eps,
        )  # fmt: skip

    def forward(
        self,
        positions: torch.Tensor,  # [T]
        query: torch.Tensor,  # [T, nH * hd]
        key: torch.Tensor,  # [T, nKV * hd]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self._fused(query, key):
            # NOTE: q and k in one Triton launch (kernels/fused/rotary.py); new tensors, the
            # same roundings as below.
            from outrider.kernels.fused.rotary import apply_rotary

            return apply_rotary(positions, query, key, self.cos_cache, self.sin_cache)
        memo = self._memo
        if memo is not None and memo[0] is positions and memo[1] == query.dtype:
            cos, sin = memo[2], memo[3]
        else:
            cos = self.cos_cache[positions].to(query.dtype)[:, None, :]  # [T, 1, hd/2]
            sin = self.sin_cache[positions].to(query.dtype)[:, None, :]
            self._memo = (positions, query.dtype, cos, sin)
        return self._rotate(query, cos, sin), self._rotate(key, cos, sin)


def get_rope(head_dim: int, max_position: int, config: Any) -> RotaryEmbedding:
    theta, scaling = rope_config(config)
    return RotaryEmbedding(head_dim, max_position, theta, scaling)
