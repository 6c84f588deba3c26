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

With the KV write, the launch may also take Qwen3's per-head q/k RMSNorm before the rotation
(``q_norm_weight``, ``k_norm_weight``): two launches fewer per layer.
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
def rope(x, partner, cos, sin, low, dt: tl.constexpr):
    """``x·cos − partner·sin`` in a head's first half (``low``), ``x·cos + partner·sin`` in its
    second, each product rounded to ``dt`` before the sum as torch's separate ops round them
    (cos and sin float32 values of ``dt``); returns ``dt``."""
    a = (x.to(tl.float32) * cos).to(dt).to(tl.float32)
    b = (partner.to(tl.float32) * sin).to(dt).to(tl.float32)
    return tl.where(low, a - b, a + b).to(dt)


@triton.jit
def head_rms_inv(sum_sq, dim, eps):
    """``1 / sqrt(sum_sq / dim + eps)`` with the roundings of ``kernels/fused/norm.py``."""
    return tl.math.div_rn(1.0, tl.sqrt_rn(tl.math.div_rn(sum_sq, dim * 1.0) + eps))


@triton.jit
def head_rms_apply(x, inv, w, dt: tl.constexpr):
    """RMSNorm's output ``w · round(x · inv)`` rounded to ``dt``, as float32 (x, inv, w float32;
    the weight in ``dt``)."""
    return (w * (x * inv).to(dt).to(tl.float32)).to(dt).to(tl.float32)


@triton.jit
def _rotary_kernel(
    positions_ptr,
    q_ptr,
    k_ptr,
    v_ptr,
    cos_ptr,
    sin_ptr,
    q_out_ptr,
    k_out_ptr,
    kc_ptr,
    vc_ptr,
    slot_ptr,
    qn_w_ptr,
    kn_w_ptr,
    eps,
    num_q_heads,
    num_kv_heads,
    stride_qt,
    stride_kt,
    stride_vt,
    stride_cache,
    stride_cb,
    stride_cs,
    stride_ch,
    block_size,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    WRITE_KV: tl.constexpr,
    HEAD_NORM: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pdl_prologue(USE_PDL)
    t = tl.program_id(0).to(tl.int64)
    # [BH] over [q heads; k heads] (and v heads with WRITE_KV)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
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
    if HEAD_NORM:
        # NOTE: Qwen3's per-head q/k RMSNorm first (kernels/fused/norm.py roundings); v heads
        # (zeros here) are loaded apart below.
        inv = head_rms_inv(tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1), 2 * HALF, eps)[:, None]
        wq1 = tl.load(qn_w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        wq2 = tl.load(qn_w_ptr + HALF + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        wk1 = tl.load(kn_w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        wk2 = tl.load(kn_w_ptr + HALF + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        x1 = head_rms_apply(x1, inv, tl.where(is_q[:, None], wq1, wk1), dt)
        x2 = head_rms_apply(x2, inv, tl.where(is_q[:, None], wq2, wk2), dt)
    o1 = rope(x1, x2, cos, sin, True, dt)
    o2 = rope(x2, x1, cos, sin, False, dt)
    q_out = q_out_ptr + t * (num_q_heads * 2 * HALF) + head_q
    tl.store(q_out, o1, mask=mq)
    tl.store(q_out + HALF, o2, mask=mq)
    if WRITE_KV:
        # NOTE: the rotated key and the value go straight to the paged cache (write_kv's
        # reshape_and_cache); a slot < 0 stores nothing.
        slot = tl.load(slot_ptr + t).to(tl.int64)
        ok = slot >= 0
        blk = tl.where(ok, slot, 0) // block_size
        cache_row = blk * stride_cb + (tl.where(ok, slot, 0) % block_size) * stride_cs
        v_heads = kv_heads - num_kv_heads
        is_v = (v_heads >= 0) & (v_heads < num_kv_heads)
        mv = is_v[:, None] & col_ok[None, :] & ok
        mk = mk & ok
        k_dst = kc_ptr + cache_row + kv_heads.to(tl.int64)[:, None] * stride_ch + cols[None, :]
        tl.store(k_dst, o1.to(kc_ptr.dtype.element_ty), mask=mk)
        tl.store(k_dst + HALF, o2.to(kc_ptr.dtype.element_ty), mask=mk)
        v_src = v_ptr + t * stride_vt + v_heads.to(tl.int64)[:, None] * (2 * HALF) + cols[None, :]
        v_dst = vc_ptr + cache_row + v_heads.to(tl.int64)[:, None] * stride_ch + cols[None, :]
        v1 = tl.load(v_src, mask=mv, other=0.0)
        v2 = tl.load(v_src + HALF, mask=mv, other=0.0)
        tl.store(v_dst, v1.to(vc_ptr.dtype.element_ty), mask=mv)
        tl.store(v_dst + HALF, v2.to(vc_ptr.dtype.element_ty), mask=mv)
    else:
        k_out = k_out_ptr + t * (num_kv_heads * 2 * HALF) + head_k
        tl.store(k_out, o1, mask=mk)
        tl.store(k_out + HALF, o2, mask=mk)


def _check(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    cos_cache: torch.Tensor,
    sin_cache: torch.Tensor,
) -> None:
    head_dim = 2 * cos_cache.shape[-1]
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


def last_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _launch(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    cos_cache: torch.Tensor,
    sin_cache: torch.Tensor,
    k_out: torch.Tensor | None,
    cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None,
    head_norm: tuple[torch.Tensor, torch.Tensor, float] | None = None,
) -> torch.Tensor:
    """Rotate into a new q (returned) and ``k_out``, or with ``cache = (value, k_cache,
    v_cache, slot_mapping)`` store the rotated key and the value in the paged cache; with
    ``head_norm`` (``head_norm_args``) each q and k head is RMS-normalised first."""
    _check(positions, query, key, cos_cache, sin_cache)
    half = cos_cache.shape[-1]
    head_dim = 2 * half
    num_tokens = query.shape[0]
    positions = last_contiguous(positions)
    query, key = last_contiguous(query), last_contiguous(key)
    if cos_cache.stride(1) != 1:
        cos_cache, sin_cache = cos_cache.contiguous(), sin_cache.contiguous()
    q_out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    num_q_heads, num_kv_heads = query.shape[1] // head_dim, key.shape[1] // head_dim
    num_heads = num_q_heads + num_kv_heads * (1 if cache is None else 2)
    if num_tokens == 0 or num_heads == 0:
        return q_out
    if cache is None:
        assert k_out is not None
        value, k_cache, v_cache, slots = key, k_out, k_out, positions
        cache_strides = (0, 0, 0)
        block_size = 1
    else:
        value, k_cache, v_cache, slots = cache
        value = last_contiguous(value)
        cache_strides = tuple(k_cache.stride()[:3])
        block_size = int(k_cache.shape[1])
    block_half = triton.next_power_of_2(half)
    block_h = max(1, min(_TILE // block_half, triton.next_power_of_2(num_heads)))
    use_pdl = pdl(query)
    _rotary_kernel[(num_tokens, triton.cdiv(num_heads, block_h))](
        positions,
        query,
        key,
        value,
        cos_cache,
        sin_cache,
        q_out,
        k_out if k_out is not None else q_out,
        k_cache,
        v_cache,
        slots,
        head_norm[0] if head_norm is not None else query,
        head_norm[1] if head_norm is not None else query,
        head_norm[2] if head_norm is not None else 0.0,
        num_q_heads,
        num_kv_heads,
        query.stride(0),
        key.stride(0),
        value.stride(0),
        cos_cache.stride(0),
        *cache_strides,
        block_size,
        HALF=half,
        BLOCK_H=block_h,
        BLOCK_HALF=block_half,
        WRITE_KV=cache is not None,
        HEAD_NORM=head_norm is not None,
        USE_PDL=use_pdl,
        launch_pdl=use_pdl,
        num_warps=4,
    )
    return q_out


def head_norm_args(
    q_norm_weight: torch.Tensor | None,
    k_norm_weight: torch.Tensor | None,
    eps: float,
    query: torch.Tensor,
    head_dim: int,
) -> tuple[torch.Tensor, torch.Tensor, float] | None:
    """``(q_weight, k_weight, eps)`` for a launch that takes the q/k RMSNorm, or None without
    weights. The weights go together, ``[head_dim]`` each, in the query's dtype and on its
    device (the norm's output dtype is then the query's)."""
    if q_norm_weight is None and k_norm_weight is None:
        return None
    if q_norm_weight is None or k_norm_weight is None:
        raise ValueError("`q_norm_weight` and `k_norm_weight` go together")
    for name, w in (("q_norm_weight", q_norm_weight), ("k_norm_weight", k_norm_weight)):
        if w.shape != (head_dim,) or w.dtype != query.dtype or w.device != query.device:
            raise ValueError(
                f"`{name}` must be [{head_dim}] {query.dtype} on {query.device}, got "
                f"{tuple(w.shape)} {w.dtype} on {w.device}"
            )
    return q_norm_weight, k_norm_weight, float(eps)


def apply_rotary(
    positions: torch.Tensor,  # [T]
    query: torch.Tensor,  # [T, nH * hd]
    key: torch.Tensor,  # [T, nKV * hd]
    cos_cache: torch.Tensor,  # [P, hd/2] float32
    sin_cache: torch.Tensor,  # [P, hd/2] float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """``rotary_ref`` in one launch; returns new contiguous ``(query, key)``."""
    k_out = torch.empty(key.shape, dtype=key.dtype, device=key.device)
    q_out = _launch(positions, query, key, cos_cache, sin_cache, k_out, None)
    return q_out, k_out


def apply_rotary_write_kv(
    positions: torch.Tensor,  # [T]
    query: torch.Tensor,  # [T, nH * hd]
    key: torch.Tensor,  # [T, nKV * hd]
    value: torch.Tensor,  # [T, nKV * hd]
    cos_cache: torch.Tensor,  # [P, hd/2] float32
    sin_cache: torch.Tensor,  # [P, hd/2] float32
    k_cache: torch.Tensor,  # [N, bs, nKV, hd]
    v_cache: torch.Tensor,  # [N, bs, nKV, hd]
    slot_mapping: torch.Tensor,  # [T] int; < 0 = skip
    *,
    q_norm_weight: torch.Tensor | None = None,  # [hd]
    k_norm_weight: torch.Tensor | None = None,  # [hd]
    eps: float = 1e-6,
) -> torch.Tensor:
    """``rotary_ref`` and the attention backends' ``write_kv`` of the rotated key and the value
    in one launch; returns the rotated query (new, contiguous) and writes no key tensor. With
    ``q_norm_weight`` and ``k_norm_weight`` (Qwen3), q and k are first RMS-normalised per head
    as ``rms_norm_ref(x.view(T, n, hd), weight, eps)`` would."""
    if value.shape != key.shape or value.dtype != key.dtype:
        raise ValueError(f"value {tuple(value.shape)} must match key {tuple(key.shape)}")
    head_dim = 2 * cos_cache.shape[-1]
    n_kv = key.shape[1] // head_dim if key.dim() == 2 else -1
    if (
        k_cache.dim() != 4
        or k_cache.shape != v_cache.shape
        or k_cache.stride() != v_cache.stride()
        or tuple(k_cache.shape[2:]) != (n_kv, head_dim)
        or k_cache.stride(-1) != 1
    ):
        raise ValueError(
            f"the KV cache must be two [N, bs, {n_kv}, {head_dim}] tensors with the same "
            f"strides and a contiguous last dimension, got {tuple(k_cache.shape)}"
        )
    if slot_mapping.dim() != 1 or slot_mapping.shape[0] != query.shape[0]:
        raise ValueError(f"slot_mapping must be [{query.shape[0]}]")
    cache = (value, k_cache, v_cache, slot_mapping)
    head_norm = head_norm_args(q_norm_weight, k_norm_weight, eps, query, head_dim)
    return _launch(positions, query, key, cos_cache, sin_cache, None, cache, head_norm)
