"""fp8 expert weights with one float32 scale per output channel (weight-only quantization).

An expert weight ``w [..., N, K]`` is stored as ``q = round_e4m3(w / scale[..., None])`` in
``float8_e4m3fn`` with ``scale [..., N] = amax_k |w| / 448``, so ``w ≈ q * scale[..., None]``.
For the MoE weights that is ``w13_scale [E, 2I]`` and ``w2_scale [E, H]``. Activations stay in
the model dtype; kernels dequantize (``q`` converts exactly to bf16/fp16/fp32) and apply the
scale to each output column after the K reduction, where it factors out of the sum.
"""

from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448


def quantize_fp8_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``w [..., N, K]`` → (``q [..., N, K]`` float8_e4m3fn, ``scale [..., N]`` float32)."""
    w32 = w.to(torch.float32)
    amax = w32.abs().amax(dim=-1)  # [..., N]
    # NOTE: an all-zero channel keeps a positive scale (its q is all zeros).
    scale = (amax / FP8_MAX).clamp_min(torch.finfo(torch.float32).tiny)  # [..., N]
    q = (w32 / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)  # [..., N, K]
    return q, scale


def dequantize_fp8(
    q: torch.Tensor,  # [..., N, K] float8_e4m3fn
    scale: torch.Tensor,  # [..., N] float32
    dtype: torch.dtype,
) -> torch.Tensor:
    """``q * scale`` computed in float32 (float64 for a float64 result), then cast to ``dtype``."""
    acc = torch.promote_types(dtype, torch.float32)
    return (q.to(acc) * scale.to(acc)[..., None]).to(dtype)  # [..., N, K]
