"""Decode attention with the rotary embedding and the KV write in the same launch, and its torch
reference.

``paged_attention_rotary`` takes the projection's raw q, k and v (column slices of the fused
qkv may be passed as they are) and does what ``apply_rotary_write_kv`` followed by
``paged_attention`` does. Where ``fused_plan`` finds a plan (``early_kv_tile``'s decode batches,
with the two programs per SM this kernel's registers allow), that is one launch of
``_paged_decode_rotary_kernel`` plus the split reduction instead of three launches:

* before the PDL wait, each program (sequence, KV head, split) loads its metadata and the cached
  keys and values of its split's first key tile, positions before this step's new tokens only,
  as ``_paged_decode_early_kernel`` does;
* after it, the raw q rows of the KV head's query heads, rotated in registers (each element and
  its partner in the other half of the head: ``x·cos ∓ partner·sin``, with the roundings of
  ``kernels/fused/rotary.py``), then the split's other cached keys;
* the program whose split holds position ``ctx_len`` (the first new token) also takes all of
  the step's new keys, from the raw k and v: the key rotated, both cast to the cache dtype,
  stored in their slots (``slot_mapping``; a slot < 0 stores nothing) and attended over as
  cast, so each new key and value is stored once and attended over as a later step reads it.

No program reads a slot that another program of the launch writes. Elsewhere the function runs
the two launches it replaces. ``OUTRIDER_DECODE_ROTARY=0`` (read at import) always takes those.

H200, Llama-3.1-8B decode step at batch 1 and 4k keys (``outrider bench-kernels --parts model
--model-shape llama8b --model-batch-sizes 1``, three alternations in one call): 4493-4506 us
against 4516-4522 us with the two launches.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from outrider.kernels.attention.metadata import AttentionMetadata
from outrider.kernels.attention.triton_attn import (
    _MIN_KEYS_PER_SPLIT,
    LOG2E,
    _cached_tile,
    _decode_rows,
    _decode_seq,
    _first_cached_tile,
    _num_splits,
    _softmax_step,
    _split_range,
    _store_partials,
    _tile_config,
    early_kv_tile,
    paged_attention,
    reduce_splits,
    split_scratch,
)
from outrider.kernels.fused.dispatch import pdl
from outrider.kernels.fused.pdl import pdl_prologue
from outrider.kernels.fused.rotary import (
    apply_rotary_write_kv,
    head_norm_args,
    head_rms_apply,
    head_rms_inv,
    last_contiguous,
    rope,
)

_ON = os.environ.get("OUTRIDER_DECODE_ROTARY", "1") != "0"
# NOTE: sm_90, bf16, 16 rows, 64-key tiles, head dim 128: 201 registers (ptxas), so two 4-warp
# programs per SM; the one launch is taken only where all of its programs are resident at once.
_PROGRAMS_PER_SM = 2
# NOTE: fused_plan's query tiles hold at most 16 rows, so at most 16 new tokens per sequence;
# 16 is also tl.dot's smallest N.
_BLOCK_NEW = 16


def rotary_write_kv_ref(
    positions: torch.Tensor,  # [T]
    q: torch.Tensor,  # [T, nH * hd]
    k: torch.Tensor,  # [T, nKV * hd]
    v: torch.Tensor,  # [T, nKV * hd]
    cos_cache: torch.Tensor,  # [P, hd/2] float32
    sin_cache: torch.Tensor,  # [P, hd/2] float32
    k_cache: torch.Tensor,  # [N, bs, nKV, hd]
    v_cache: torch.Tensor,  # [N, bs, nKV, hd]
    slot_mapping: torch.Tensor,  # [T]; < 0 = not written
    *,
    q_norm_weight: torch.Tensor | None = None,  # [hd]
    k_norm_weight: torch.Tensor | None = None,  # [hd]
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch reference of the launch's first part: the optional per-head q/k RMSNorm, the
    rotary and the KV write as separate ops; returns the rotated ``(q, k)`` and writes the
    caches. The attention over them is ``torch_ref.paged_attention``."""
    from outrider.kernels.attention import torch_ref
    from outrider.kernels.fused.norm import rms_norm_ref
    from outrider.kernels.fused.rotary import rotary_ref

    hd = 2 * cos_cache.shape[-1]
    t = q.shape[0]
    if q_norm_weight is not None and k_norm_weight is not None:
        q = rms_norm_ref(q.reshape(t, -1, hd), q_norm_weight, eps).view(t, -1)
        k = rms_norm_ref(k.reshape(t, -1, hd), k_norm_weight, eps).view(t, -1)
    q_r, k_r = rotary_ref(positions, q, k, cos_cache, sin_cache)
    torch_ref.write_kv(k_r.view(t, -1, hd), v.reshape(t, -1, hd), k_cache, v_cache, slot_mapping)
    return q_r, k_r


@triton.jit
def _new_keys_tile(
    acc,
    m_i,
    l_i,
    q,
    row_ok,
    q_pos,
    scale_log2,
    q_start,
    q_len,
    ctx_len,
    kvh,
    offs_d,
    d_ok,
    partner_d,
    half_d,
    low,
    k_ptr,
    v_ptr,
    positions_ptr,
    cos_ptr,
    sin_ptr,
    slot_ptr,
    kn_w_ptr,
    eps,
    kc_ptr,
    vc_ptr,
    stride_kt,
    stride_vt,
    stride_cos,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_NEW: tl.constexpr,
    CAUSAL: tl.constexpr,
    DOT_PREC: tl.constexpr,
    HEAD_NORM: tl.constexpr,
):
    """This step's ``q_len`` new keys (positions ``ctx_len + j``) into the online softmax: each
    key rotated from the raw input, key and value cast to the cache dtype and stored in their
    slots; returns the updated ``(acc, m_i, l_i)``."""
    j = tl.arange(0, BLOCK_NEW)
    new = j < q_len  # [NEW]
    offs_n = ctx_len + j  # [NEW] key positions
    tok_n = (q_start + j).to(tl.int64)
    kd_ok = new[None, :] & d_ok[:, None]  # [D, NEW]
    k_row = k_ptr + tok_n[None, :] * stride_kt + kvh * HEAD_DIM
    kx = tl.load(k_row + offs_d[:, None], mask=kd_ok, other=0.0)  # [D, NEW]
    kp = tl.load(k_row + partner_d[:, None], mask=kd_ok, other=0.0)
    if HEAD_NORM:
        kx, kp = kx.to(tl.float32), kp.to(tl.float32)
        inv = head_rms_inv(tl.sum(kx * kx, 0), HEAD_DIM, eps)[None, :]  # [1, NEW]
        w = tl.load(kn_w_ptr + offs_d, mask=d_ok, other=0.0).to(tl.float32)[:, None]
        wp = tl.load(kn_w_ptr + partner_d, mask=d_ok, other=0.0).to(tl.float32)[:, None]
        kx = head_rms_apply(kx, inv, w, k_ptr.dtype.element_ty)
        kp = head_rms_apply(kp, inv, wp, k_ptr.dtype.element_ty)
    pos = tl.load(positions_ptr + tok_n, mask=new, other=0).to(tl.int64)  # [NEW]
    cs = pos[None, :] * stride_cos + half_d[:, None]  # [D, NEW]
    dt = k_ptr.dtype.element_ty
    cos = tl.load(cos_ptr + cs, mask=kd_ok, other=0.0).to(dt).to(tl.float32)
    sin = tl.load(sin_ptr + cs, mask=kd_ok, other=0.0).to(dt).to(tl.float32)
    k = rope(kx, kp, cos, sin, low[:, None], dt).to(kc_ptr.dtype.element_ty)  # [D, NEW]
    vd_ok = new[:, None] & d_ok[None, :]  # [NEW, D]
    v = tl.load(
        v_ptr + tok_n[:, None] * stride_vt + kvh * HEAD_DIM + offs_d[None, :], mask=vd_ok, other=0.0
    ).to(vc_ptr.dtype.element_ty)  # [NEW, D]
    slot = tl.load(slot_ptr + tok_n, mask=new, other=-1).to(tl.int64)  # [NEW]
    put = new & (slot >= 0)
    slot = tl.where(put, slot, 0)
    blk, in_blk = slot // BLOCK_SIZE, slot % BLOCK_SIZE
    k_dst = kc_ptr + blk * stride_kb + in_blk * stride_ks + kvh * stride_kh  # [NEW]
    v_dst = vc_ptr + blk * stride_vb + in_blk * stride_vs + kvh * stride_vh
    tl.store(k_dst[None, :] + offs_d[:, None], k, mask=put[None, :] & d_ok[:, None])
    tl.store(v_dst[:, None] + offs_d[None, :], v, mask=put[:, None] & d_ok[None, :])
    p, alpha, m_i, l_i = _softmax_step(
        q, k, offs_n, new, row_ok, q_pos, m_i, l_i, scale_log2, CAUSAL, DOT_PREC
    )
    acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=DOT_PREC)
    return acc, m_i, l_i


@triton.jit(do_not_specialize=["num_splits", "stride_bt"])
def _paged_decode_rotary_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    positions_ptr,
    cos_ptr,
    sin_ptr,
    slot_ptr,
    qn_w_ptr,
    kn_w_ptr,
    eps,
    kc_ptr,
    vc_ptr,
    part_acc_ptr,
    part_m_ptr,
    part_l_ptr,
    qsl_ptr,
    seq_lens_ptr,
    bt_ptr,
    num_heads,
    num_splits,
    scale_log2,
    stride_qt,
    stride_kt,
    stride_vt,
    stride_cos,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_bt,
    BLOCK_SIZE: tl.constexpr,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_NEW: tl.constexpr,
    CAUSAL: tl.constexpr,
    DOT_PREC: tl.constexpr,
    HEAD_NORM: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """One program per (sequence, KV head, split): the split's cached keys, then, in the program
    whose split holds position ``ctx_len``, all of this step's new keys (rotated, and stored in
    the cache); partial outputs for ``_reduce_splits_kernel``."""
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    # NOTE: up to pdl_prologue: host-staged metadata and cached K/V of positions before this
    # step's new tokens, which nothing in the running launch chain writes (kernels/fused/pdl.py).
    q_start, q_len, seq_len = _decode_seq(qsl_ptr, seq_lens_ptr, b)
    if q_len <= 0:
        return
    ctx_len, head, row_ok, tok, q_pos, offs_d, d_ok = _decode_rows(
        q_start, q_len, seq_len, kvh, GROUP, HEAD_DIM, BLOCK_D, BLOCK_M
    )
    low = offs_d < HEAD_DIM // 2  # [D] first half of the head
    partner_d = tl.where(low, offs_d + HEAD_DIM // 2, offs_d - HEAD_DIM // 2)
    half_d = tl.where(low, offs_d, offs_d - HEAD_DIM // 2)
    lo, hi = _split_range(seq_len, split, num_splits, BLOCK_N)
    cached_hi = tl.minimum(hi, ctx_len)  # the split's keys read from the cache: [lo, cached_hi)
    bt_row = bt_ptr + b.to(tl.int64) * stride_bt
    offs_n, n_ok, k, v, _, _ = _first_cached_tile(
        kc_ptr, vc_ptr, bt_row, lo, cached_hi, ctx_len, kvh, offs_d, d_ok,
        stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, BLOCK_SIZE, BLOCK_N,
    )  # fmt: skip
    pdl_prologue(USE_PDL)
    qd_ok = row_ok[:, None] & d_ok[None, :]  # [M, D]
    q_row = q_ptr + tok[:, None] * stride_qt + head[:, None] * HEAD_DIM
    qx = tl.load(q_row + offs_d[None, :], mask=qd_ok, other=0.0)  # [M, D]
    qp = tl.load(q_row + partner_d[None, :], mask=qd_ok, other=0.0)
    if HEAD_NORM:
        qx, qp = qx.to(tl.float32), qp.to(tl.float32)
        inv = head_rms_inv(tl.sum(qx * qx, 1), HEAD_DIM, eps)[:, None]  # [M, 1]
        w = tl.load(qn_w_ptr + offs_d, mask=d_ok, other=0.0).to(tl.float32)[None, :]
        wp = tl.load(qn_w_ptr + partner_d, mask=d_ok, other=0.0).to(tl.float32)[None, :]
        qx = head_rms_apply(qx, inv, w, q_ptr.dtype.element_ty)
        qp = head_rms_apply(qp, inv, wp, q_ptr.dtype.element_ty)
    pos = tl.load(positions_ptr + tok, mask=row_ok, other=0).to(tl.int64)  # [M]
    cs = pos[:, None] * stride_cos + half_d[None, :]  # [M, D]
    dt = q_ptr.dtype.element_ty
    cos = tl.load(cos_ptr + cs, mask=qd_ok, other=0.0).to(dt).to(tl.float32)
    sin = tl.load(sin_ptr + cs, mask=qd_ok, other=0.0).to(dt).to(tl.float32)
    q = rope(qx, qp, cos, sin, low[None, :], dt)  # [M, D]
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    p, alpha, m_i, l_i = _softmax_step(
        q, k, offs_n, n_ok, row_ok, q_pos, m_i, l_i, scale_log2, CAUSAL, DOT_PREC
    )
    acc = tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=DOT_PREC)  # [M, D]
    for start in range(lo + BLOCK_N, cached_hi, BLOCK_N):
        acc, m_i, l_i = _cached_tile(
            acc, m_i, l_i, q, kc_ptr, vc_ptr, bt_row, start, cached_hi, kvh, offs_d, d_ok, row_ok,
            q_pos, scale_log2, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
            BLOCK_SIZE, BLOCK_N, CAUSAL, DOT_PREC,
        )  # fmt: skip
    # NOTE: the splits cover [0, seq_len) and ctx_len < seq_len: exactly one program per
    # (sequence, KV head) takes the new keys, so each is stored once.
    if (lo <= ctx_len) & (ctx_len < hi):
        acc, m_i, l_i = _new_keys_tile(
            acc, m_i, l_i, q, row_ok, q_pos, scale_log2, q_start, q_len, ctx_len, kvh,
            offs_d, d_ok, partner_d, half_d, low,
            k_ptr, v_ptr, positions_ptr, cos_ptr, sin_ptr, slot_ptr, kn_w_ptr, eps, kc_ptr,
            vc_ptr, stride_kt, stride_vt, stride_cos,
            stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
            HEAD_DIM, BLOCK_SIZE, BLOCK_NEW, CAUSAL, DOT_PREC, HEAD_NORM,
        )  # fmt: skip

    _store_partials(
        part_acc_ptr, part_m_ptr, part_l_ptr, acc, m_i, l_i, tok, head, row_ok, offs_d,
        num_heads, num_splits, split, BLOCK_D,
    )  # fmt: skip


def fused_plan(
    md: AttentionMetadata,
    n_heads: int,
    n_kv: int,
    hd: int,
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[int, int, int, int, int] | None:
    """``(BLOCK_M, BLOCK_N, num_warps, num_stages, num_splits)`` of the one-launch path for this
    batch, or None where ``paged_attention_rotary`` runs the rotary and attention launches."""
    b = md.num_seqs
    if not _ON or b == 0 or n_heads % n_kv or md.max_query_len < 1:
        return None
    group = n_heads // n_kv
    block_m, block_n, num_warps, num_stages = _tile_config(md.max_query_len, group, hd, dtype)
    block_q = block_m // group
    if md.max_query_len > block_q:
        return None
    num_splits = _num_splits(device, b, n_kv, md.max_seq_len, block_n)
    if not early_kv_tile(md, n_kv, block_m, block_q, block_n, num_splits, device, _PROGRAMS_PER_SM):
        return None
    return block_m, block_n, num_warps, num_stages, num_splits


def paged_attention_rotary(
    positions: torch.Tensor,  # [T]
    q: torch.Tensor,  # [T, nH * hd]
    k: torch.Tensor,  # [T, nKV * hd]
    v: torch.Tensor,  # [T, nKV * hd]
    cos_cache: torch.Tensor,  # [P, hd/2] float32
    sin_cache: torch.Tensor,  # [P, hd/2] float32
    k_cache: torch.Tensor,  # [N, bs, nKV, hd]
    v_cache: torch.Tensor,  # [N, bs, nKV, hd]
    md: AttentionMetadata,
    scale: float,
    *,
    q_norm_weight: torch.Tensor | None = None,  # [hd]
    k_norm_weight: torch.Tensor | None = None,  # [hd]
    eps: float = 1e-6,
) -> torch.Tensor:
    """``paged_attention(apply_rotary_write_kv(...))``: the attention output [T, nH, hd]; the
    rotated keys and the values are written to the cache. One launch plus the split reduction
    where ``early_kv_tile`` holds (module docstring)."""
    hd = 2 * cos_cache.shape[-1]
    t = q.shape[0]
    n_kv = k_cache.shape[2]
    n_heads = q.shape[1] // hd if q.dim() == 2 else 0
    shapes_ok = q.dim() == 2 and n_heads * hd == q.shape[1]
    if not shapes_ok or k.shape != v.shape or k.shape != (t, n_kv * hd):
        raise ValueError(
            f"q, k and v must be [T, nH * {hd}], [T, {n_kv * hd}] and [T, {n_kv * hd}], got "
            f"{tuple(q.shape)}, {tuple(k.shape)} and {tuple(v.shape)}"
        )
    plan = fused_plan(md, n_heads, n_kv, hd, q.dtype, q.device)
    if plan is None or not k.dtype == q.dtype == v.dtype:
        q_r = apply_rotary_write_kv(
            positions, q, k, v, cos_cache, sin_cache, k_cache, v_cache, md.slot_mapping,
            q_norm_weight=q_norm_weight, k_norm_weight=k_norm_weight, eps=eps,
        )  # fmt: skip
        return paged_attention(q_r.view(t, n_heads, hd), k_cache, v_cache, md, scale)
    if k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1:
        raise ValueError("the key and value caches need the same strides, the last one 1")
    q, k, v = last_contiguous(q), last_contiguous(k), last_contiguous(v)
    positions = last_contiguous(positions)
    if cos_cache.stride(-1) != 1 or cos_cache.stride() != sin_cache.stride():
        cos_cache, sin_cache = cos_cache.contiguous(), sin_cache.contiguous()
    head_norm = head_norm_args(q_norm_weight, k_norm_weight, eps, q, hd)
    block_m, block_n, num_warps, num_stages, num_splits = plan
    group = n_heads // n_kv
    dev = q.device
    out = torch.empty((t, n_heads, hd), dtype=q.dtype, device=dev)
    block_d = triton.next_power_of_2(hd)
    part_acc, part_m, part_l = split_scratch(md, t, n_heads, num_splits, block_d, dev)
    tables = md.block_tables.to(dev)
    use_pdl = pdl(q)
    _paged_decode_rotary_kernel[(md.num_seqs, n_kv, num_splits)](
        q, k, v, positions.to(dev), cos_cache, sin_cache, md.slot_mapping.to(dev),
        *(head_norm or (q, q, 0.0)),
        k_cache, v_cache, part_acc, part_m, part_l,
        md.query_start_loc.to(dev), md.seq_lens.to(dev), tables,
        n_heads, num_splits, scale * LOG2E,
        q.stride(0), k.stride(0), v.stride(0), cos_cache.stride(0),
        *k_cache.stride()[:3], *v_cache.stride()[:3], tables.stride(0),
        BLOCK_SIZE=k_cache.shape[1],
        GROUP=group,
        HEAD_DIM=hd,
        BLOCK_D=block_d,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_NEW=_BLOCK_NEW,
        CAUSAL=bool(md.causal),
        DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32",
        HEAD_NORM=head_norm is not None,
        USE_PDL=use_pdl,
        launch_pdl=use_pdl,
        num_warps=num_warps,
        num_stages=num_stages,
    )  # fmt: skip
    reduce_splits(out, part_acc, part_m, part_l, num_splits)
    return out


def warm_up_rotary(
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device,
    causal: tuple[bool, ...] = (True,),
) -> int:
    """Compile the one-launch kernel for these shapes (a decode step over two key tiles, q, k
    and v as column slices of one fused qkv, as the models pass them) in each ``causal`` mode;
    returns the launches made (0 where no decode batch would take it)."""
    keys = 2 * _MIN_KEYS_PER_SPLIT + 1
    num_blocks = -(-keys // block_size)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.zeros(shape, dtype=dtype, device=device)
    v_cache = torch.zeros_like(k_cache)
    table = torch.arange(num_blocks, dtype=torch.int64, device=device).view(1, num_blocks)
    qkv = torch.zeros((1, (num_heads + 2 * num_kv_heads) * head_dim), dtype=dtype, device=device)
    kv_width = num_kv_heads * head_dim
    q, k, v = qkv.split([num_heads * head_dim, kv_width, kv_width], dim=1)
    cos = torch.zeros((keys, head_dim // 2), dtype=torch.float32, device=device)
    positions = torch.full((1,), keys - 1, dtype=torch.int64, device=device)
    count = 0
    for c in causal:
        md = AttentionMetadata(
            slot_mapping=torch.full((1,), -1, dtype=torch.int64, device=device),
            query_start_loc=torch.tensor([0, 1], dtype=torch.int64, device=device),
            seq_lens=torch.tensor([keys], dtype=torch.int64, device=device),
            block_tables=table,
            max_query_len=1,
            max_seq_len=keys,
            causal=c,
        )
        if fused_plan(md, num_heads, num_kv_heads, head_dim, dtype, device) is None:
            continue
        paged_attention_rotary(positions, q, k, v, cos, cos, k_cache, v_cache, md, 1.0)
        count += 1
    return count
