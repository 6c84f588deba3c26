"""RMSNorm, with and without the fused residual add, in one Triton launch (and the reference).

Semantics are those of ``workers/layers/norm.py``: the sum ``x + residual`` is rounded to x's
dtype (it is the new residual), the statistics and the scaling run in float32, the normalised
row is rounded to x's dtype and then multiplied by the weight in the promoted dtype of weight and
x. The kernel makes the same roundings in the same order, so it differs from the reference only
by the float32 reduction order of the mean of squares.

``_rms_norm_kernel`` handles a tile of ``BLOCK_R`` rows of ``dim`` elements per program. A row is
``(t, h)``: 2-D inputs ``[T, D]`` have one head, 3-D inputs ``[T, nH, D]`` (Qwen3's q/k norm on
column slices of the fused qkv, strided in t and h) are normalised per head. Outputs are new
contiguous tensors; the grid comes from host integers, so the launch is CUDA-graph safe.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from outrider.kernels.fused.dispatch import pdl
from outrider.kernels.fused.pdl import pdl_prologue

_TILE = 4096  # elements of one program's [BLOCK_R, BLOCK_D] tile, when the row is shorter


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.to(torch.float32)
    xf = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def fused_add_rms_norm_ref(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(norm(x + residual), x + residual)``."""
    s = x + residual  # [T, H]
    return rms_norm_ref(s, weight, eps), s


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    out_ptr,
    res_out_ptr,
    num_rows,
    num_heads,
    dim,
    stride_xt,
    stride_xh,
    stride_rt,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pdl_prologue(USE_PDL)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # [BR]
    cols = tl.arange(0, BLOCK_D)  # [BD]
    row_ok = rows < num_rows
    col_ok = cols < dim
    mask = row_ok[:, None] & col_ok[None, :]
    rows64 = rows.to(tl.int64)
    t = rows64 // num_heads
    h = rows64 % num_heads
    x_off = (t * stride_xt + h * stride_xh)[:, None] + cols[None, :]
    out_off = (rows64 * dim)[:, None] + cols[None, :]
    x = tl.load(x_ptr + x_off, mask=mask, other=0.0)
    xf = x.to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + (t * stride_rt)[:, None] + cols[None, :], mask=mask, other=0.0)
        s = (xf + r.to(tl.float32)).to(x.dtype)
        tl.store(res_out_ptr + out_off, s, mask=mask)
        xf = s.to(tl.float32)
    mean_sq = tl.math.div_rn(tl.sum(xf * xf, axis=1), dim * 1.0)  # [BR]
    inv = tl.math.div_rn(1.0, tl.sqrt_rn(mean_sq + eps))
    normed = (xf * inv[:, None]).to(x.dtype).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    y = w[None, :] * normed
    tl.store(out_ptr + out_off, y.to(out_ptr.dtype.element_ty), mask=mask)


def _launch(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    dim = x.shape[-1]
    if weight.shape != (dim,):
        raise ValueError(f"weight must have shape ({dim},), got {tuple(weight.shape)}")
    out_dtype = torch.promote_types(weight.dtype, x.dtype)
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    res_out = torch.empty_like(out, dtype=x.dtype) if residual is not None else None
    if x.dim() == 3 and x.stride(-1) == 1 and residual is None:
        xv = x  # [T, nH, D] per-head rows, strided in T and nH
        num_heads, stride_xt, stride_xh = x.shape[1], x.stride(0), x.stride(1)
    else:
        xv = x.reshape(-1, dim)
        if xv.stride(-1) != 1:
            xv = xv.contiguous()
        num_heads, stride_xt, stride_xh = 1, xv.stride(0), 0
    num_rows = out.numel() // dim if dim else 0
    stride_rt = 0
    if residual is not None:
        residual = residual.reshape(-1, dim)
        if residual.stride(-1) != 1:
            residual = residual.contiguous()
        stride_rt = residual.stride(0)
    if num_rows == 0:
        return out, res_out
    block_d = triton.next_power_of_2(dim)
    block_r = max(1, min(_TILE // block_d, triton.next_power_of_2(num_rows)))
    use_pdl = pdl(x)
    _rms_norm_kernel[(triton.cdiv(num_rows, block_r),)](
        xv,
        residual if residual is not None else xv,
        weight,
        out,
        res_out if res_out is not None else out,
        num_rows,
        num_heads,
        dim,
        stride_xt,
        stride_xh,
        stride_rt,
        eps,
        HAS_RESIDUAL=residual is not None,
        BLOCK_R=block_r,
        BLOCK_D=block_d,
        USE_PDL=use_pdl,
        launch_pdl=use_pdl,
        num_warps=min(16, max(1, block_r * block_d // 512)),
    )
    return out, res_out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``rms_norm_ref`` in one launch; ``x [..., D]`` (``[T, nH, D]``: per head), out contiguous."""
    return _launch(x, None, weight, eps)[0]


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``fused_add_rms_norm_ref`` in one launch: ``(norm(x + residual), x + residual)``."""
    if residual.shape != x.shape or residual.dtype != x.dtype:
        raise ValueError(
            f"residual must match x ({tuple(x.shape)}, {x.dtype}), "
            f"got {tuple(residual.shape)}, {residual.dtype}"
        )
    out, res_out = _launch(x, residual, weight, eps)
    assert res_out is not None
    return out, res_out
