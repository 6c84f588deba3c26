"""Rotary embedding of q and k in one Triton launch (NeoX layout), and its torch reference.

Semantics are those of ``workers/layers/rotary.py``: each head's two halves ``x1, x2`` rotate
together, ``(x1·cos − x2·sin, x2·cos + x1·sin)``, with cos/sin looked up in the float32 cache
at each token's position and cast to the query dtype, every product and sum rounded to that
dtype as torch rounds it. The kernel spells out the reference's roundings; the interpreter
agrees bit for bit, but on an H200 half-precision results came out up to one unit in the last
place off (the compiler may fold an intermediate rounding), and in float32 it may contract a
product into the sum.

One program rotates ``BLOCK_H`` heads of one token, counted over q's heads then k's, so q and k
share the launch and the cos/sin row. q and k may be column slices of the fused qkv (row
stride of their own); the outputs are new contiguous tensors (the inputs are left alone: a
caller may pass the same tensor twice). The grid comes from host integers (CUDA-graph safe).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from outrider.kernels.fused.dispatch import pdl
from outrider.kernels.fused.pdl import pdl_prologue

_TILE = 1024  # elements of one program's [BLOCK_H, BLOCK_HALF] half-head tile


def rotary_ref(
    positions: torch.Tensor,  # [T]
    query: torch.Tensor,  # [T, nH * hd]
    key: torch.Tensor,  # [T, nKV * hd]
    cos_cache: torch.Tensor,  # [P, hd/2] float32
    sin_cache: torch.Tensor,  # [P, hd/2] float32
) -> tuple[torch.Tensor, torch.Tensor]:
    half = cos_cache.shape[-1]
    cos = cos_cache[positions].to(query.dtype)[:, None, :]  # [T, 1, hd/2]
    sin = sin_cache[positions].to(query.dtype)[:, None, :]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        t = x.shape[0]
        x1, x2 = x.view(t, -1, 2 * half).chunk(2, dim=-1)  # [T, n, hd/2] each
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).view(t, -1)

    return rotate(query), rotate(key)


@triton.jit
def _rotary_kernel(
    positions_ptr,
    q_ptr,
    k_ptr,
    cos_ptr,
    sin_ptr,
    q_out_ptr,
    k_out_ptr,
    num_q_heads,
    num_kv_heads,
    stride_qt,
    stride_kt,
    stride_cache,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pdl_prologue(USE_PDL)
    t = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)  # [BH] over [q heads; k heads]
    cols = tl.arange(0, BLOCK_HALF)  # [BHALF]
    col_ok = cols < HALF
    dt = q_out_ptr.dtype.element_ty
    pos = tl.load(positions_ptr + t).to(tl.int64)
    cos = tl.load(cos_ptr + pos * stride_cache + cols, mask=col_ok, other=0.0)
    sin = tl.load(sin_ptr + pos * stride_cache + cols, mask=col_ok, other=0.0)
    cos = cos.to(dt).to(tl.float32)[None, :]  # [1, BHALF]
    sin = sin.to(dt).to(tl.float32)[None, :]
    is_q = heads < num_q_heads
    kv_heads = heads - num_q_heads
    is_k = (kv_heads >= 0) & (kv_heads < num_kv_heads)
    mq = is_q[:, None] & col_ok[None, :]
    mk = is_k[:, None] & col_ok[None, :]
    head_q = heads.to(tl.int64)[:, None] * (2 * HALF) + cols[None, :]  # [BH, BHALF]
    head_k = kv_heads.to(tl.int64)[:, None] * (2 * HALF) + cols[None, :]
    q_in = q_ptr + t * stride_qt + head_q
    k_in = k_ptr + t * stride_kt + head_k
    x1 = tl.where(mq, tl.load(q_in, mask=mq, other=0.0), tl.load(k_in, mask=mk, other=0.0))
    x2 = tl.where(
        mq, tl.load(q_in + HALF, mask=mq, other=0.0), tl.load(k_in + HALF, mask=mk, other=0.0)
    )
    x1 = x1.to(tl.float32)
    x2 = x2.to(tl.float32)
    # NOTE: each product is rounded to the dtype before the sum, as torch's separate ops do.
    o1 = ((x1 * cos).to(dt).to(tl.float32) - (x2 * sin).to(dt).to(tl.float32)).to(dt)
    o2 = ((x2 * cos).to(dt).to(tl.float32) + (x1 * sin).to(dt).to(tl.float32)).to(dt)
    q_out = q_out_ptr + t * (num_q_heads * 2 * HALF) + head_q
    k_out = k_out_ptr + t * (num_kv_heads * 2 * HALF) + head_k
    tl.store(q_out, o1, mask=mq)
    tl.store(q_out + HALF, o2, mask=mq)
    tl.store(k_out, o1, mask=mk)
    tl.store(k_out + HALF, o2, mask=mk)


def apply_rotary(
    positions: torch.Tensor,  # [T]
    query: torch.Tensor,  # [T, nH * hd]
    key: torch.Tensor,  # [T, nKV * hd]
    cos_cache: torch.Tensor,  # [P, hd/2] float32
    sin_cache: torch.Tensor,  # [P, hd/2] float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """``rotary_ref`` in one launch; returns new contiguous ``(query, key)``."""
    half = cos_cache.shape[-1]
    head_dim = 2 * half
    num_tokens = query.shape[0]
    if query.dim() != 2 or key.dim() != 2 or key.shape[0] != num_tokens:
        raise ValueError(
            f"query and key must be [T, n * {head_dim}], got {tuple(query.shape)}, "
            f"{tuple(key.shape)}"
        )
    if query.shape[1] % head_dim or key.shape[1] % head_dim:
        raise ValueError(f"query and key widths must be multiples of head_dim {head_dim}")
    if key.dtype != query.dtype:
        raise ValueError(f"key dtype {key.dtype} differs from query dtype {query.dtype}")
    if sin_cache.shape != cos_cache.shape or cos_cache.stride() != sin_cache.stride():
        raise ValueError("cos_cache and sin_cache must have the same shape and strides")
    if positions.dim() != 1 or positions.shape[0] != num_tokens:
        raise ValueError(f"positions must be [{num_tokens}], got {tuple(positions.shape)}")
    if positions.stride(0) != 1:
        positions = positions.contiguous()
    if query.stride(1) != 1:
        query = query.contiguous()
    if key.stride(1) != 1:
        key = key.contiguous()
    if cos_cache.stride(1) != 1:
        cos_cache, sin_cache = cos_cache.contiguous(), sin_cache.contiguous()
    q_out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    k_out = torch.empty(key.shape, dtype=key.dtype, device=key.device)
    num_q_heads, num_kv_heads = query.shape[1] // head_dim, key.shape[1] // head_dim
    num_heads = num_q_heads + num_kv_heads
    if num_tokens == 0 or num_heads == 0:
        return q_out, k_out
    block_half = triton.next_power_of_2(half)
    block_h = max(1, min(_TILE // block_half, triton.next_power_of_2(num_heads)))
    use_pdl = pdl(query)
    _rotary_kernel[(num_tokens, triton.cdiv(num_heads, block_h))](
        positions,
        query,
        key,
        cos_cache,
        sin_cache,
        q_out,
        k_out,
        num_q_heads,
        num_kv_heads,
        query.stride(0),
        key.stride(0),
        cos_cache.stride(0),
        HALF=half,
        BLOCK_H=block_h,
        BLOCK_HALF=block_half,
        USE_PDL=use_pdl,
        launch_pdl=use_pdl,
        num_warps=4,
    )
    return q_out, k_out
