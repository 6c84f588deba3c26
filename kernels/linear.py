"""CPU fast path for linear layers: oneDNN with the weight prepacked once.

On x86 CPUs oneDNN's blocked weight layout runs decode-shaped products ([1..16, K] x [K, N])
about twice as fast as F.linear's BLAS call. The packed copy is built on first use and rebuilt
when the weight changes. Any other device or dtype goes through F.linear, the reference.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

_PACKABLE = (torch.float32, torch.bfloat16)
# NOTE: oneDNN picks its blocking from this row-count hint; decode batches are small.
_BATCH_HINT = 8


def _enabled() -> bool:
    return (
        os.environ.get("OUTRIDER_CPU_PACKED_LINEAR", "1") != "0"
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    )


ENABLED = _enabled()


def can_pack(weight: torch.Tensor) -> bool:
    return ENABLED and weight.device.type == "cpu" and weight.dtype in _PACKABLE


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """Reorder ``weight [N, K]`` into oneDNN's blocked layout (an opaque tensor)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), _BATCH_HINT)


def packed_linear(
    x: torch.Tensor,  # [..., K]
    packed: torch.Tensor,
    bias: torch.Tensor | None,
    out_features: int,
) -> torch.Tensor:
    lead = x.shape[:-1]
    out = torch.ops.mkldnn._linear_pointwise(
        x.reshape(-1, x.shape[-1]), packed, bias, "none", [], ""
    )  # [M, N]
    return out.view(*lead, out_features)


def linear_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    return F.linear(x, weight, bias)
