"""RMSNorm with the optional fused residual add of vLLM's decoder layers."""

from __future__ import annotations

import torch
from torch import nn

from outrider.kernels.fused.dispatch import FUSED_DTYPES, use_fused


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        # NOTE: normalised in float32 for every dtype (HF and vLLM semantics, float64 included);
        # the learned scale applies in x's dtype.
        xf = x.to(torch.float32)
        xf = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``norm(x)``, or with a residual: ``(norm(x + residual), x + residual)``."""
        if use_fused(x) and self.weight.dtype in FUSED_DTYPES and self.weight.device == x.device:
            # NOTE: one Triton launch (kernels/fused/norm.py), same roundings as below.
            from outrider.kernels.fused import norm as fused

            if residual is None:
                return fused.rms_norm(x, self.weight, self.eps)
            if residual.dtype == x.dtype and residual.shape == x.shape:
                return fused.fused_add_rms_norm(x, residual, self.weight, self.eps)
        if residual is None:
            return self._norm(x)
        x = x + residual  # [T, H]
        return self._norm(x), x
