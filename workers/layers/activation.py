"""Gated activations."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from outrider.kernels.fused.dispatch import use_fused


class SiluAndMul(nn.Module):
    """``silu(x[..., :d]) * x[..., d:]`` for ``x [..., 2d]`` (gate rows first, then up)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_fused(x):
            # NOTE: one Triton launch (kernels/fused/activation.py), same roundings as below.
            from outrider.kernels.fused.activation import silu_and_mul

            return silu_and_mul(x)  # [..., d]
        d = x.shape[-1] // 2
        return F.silu(x[..., :d]) * x[..., d:]  # [..., d]
