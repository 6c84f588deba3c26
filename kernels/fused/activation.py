"""SiLU(gate)·up on the merged ``[T, 2I]`` gate_up output in one Triton launch, and the reference.

Semantics are those of ``workers/layers/activation.py``: ``silu(x[..., :I]) * x[..., I:]``, the
SiLU computed in float32 and rounded to x's dtype, then the product rounded to it. The kernel
makes the same roundings; its float32 ``exp`` is the hardware approximation, so a rounded SiLU
may land one unit in the last place from torch's.

One program covers ``BLOCK`` columns of one row; the grid comes from host integers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from outrider.kernels.fused.dispatch import pdl
from outrider.kernels.fused.pdl import pdl_prologue

_BLOCK = 1024


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    d = x.shape[-1] // 2
    return F.silu(x[..., :d]) * x[..., d:]  # [..., d]


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, d, stride_xt, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    pdl_prologue(USE_PDL)
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    gate = tl.load(x_ptr + t * stride_xt + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + t * stride_xt + d + cols, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    silu = tl.math.div_rn(g, 1.0 + tl.exp(-g)).to(gate.dtype).to(tl.float32)
    out = (silu * up.to(tl.float32)).to(gate.dtype)
    tl.store(out_ptr + t * d + cols, out, mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``silu_and_mul_ref`` in one launch; ``x [..., 2I]`` → new contiguous ``[..., I]``."""
    if x.shape[-1] % 2:
        raise ValueError(f"the last dimension must be even (gate; up), got {x.shape[-1]}")
    d = x.shape[-1] // 2
    out = torch.empty((*x.shape[:-1], d), dtype=x.dtype, device=x.device)
    rows = x.reshape(-1, 2 * d)  # [T, 2I]
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    num_rows = rows.shape[0]
    if num_rows == 0 or d == 0:
        return out
    block = min(_BLOCK, triton.next_power_of_2(d))
    use_pdl = pdl(x)
    _silu_and_mul_kernel[(num_rows, triton.cdiv(d, block))](
        rows, out, d, rows.stride(0), BLOCK=block, USE_PDL=use_pdl, launch_pdl=use_pdl, num_warps=4
    )
    return out
