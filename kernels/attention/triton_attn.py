"""Triton paged attention: one kernel for prefill, decode, verify and the block.

One kernel does the work, a second finishes small batches, and a third takes decode at small
batch (the KV write is ``triton_kv_write.py``):

* ``_paged_attn_kernel``: one program per (query tile, KV head, KV split). A tile holds
  ``BLOCK_Q`` consecutive query tokens of one sequence times the ``GROUP = nH // nKV`` query
  heads that share one KV head, so the matrix row ``r`` is (token ``r // GROUP``, head
  ``r % GROUP``) and each key/value tile read from the cache serves every query head of the
  group (decode and verify read the KV once per sequence and KV head, as a prefill tile does).
  Softmax is online, in float32 and in the log2 domain. Causal rows see keys
  ``<= seq_len - q_len + i``; the non-causal block (DFlash) sees all ``seq_len`` keys.
* ``_reduce_splits_kernel``: when a batch is too small to fill the GPU (decode and verify at
  small batch), the keys of each tile are split over ``num_splits`` programs that write
  unnormalised partial outputs with their running max and sum (flash-decoding); this kernel
  merges them.
* ``_paged_decode_early_kernel``: decode-sized tiles whose splits hold at most two key tiles,
  with every program resident at once (``early_kv_tile``): one program per (sequence, KV head,
  split), and the split's first key tile loads before the PDL wait (below). Models reach the
  same decode batches through ``triton_decode_rotary.py`` (``attend_rotary``), whose kernel also
  does the rotary embedding and the KV write.

The grid depends only on host integers (T, B, nKV, ``md.max_query_len`` and a split count
derived from the batch geometry and ``md.max_seq_len``); sequence boundaries are found inside
the kernel by a binary search over ``query_start_loc`` (tile ``j`` of sequence ``b`` has global
index ``query_start_loc[b] // BLOCK_Q + b + j``), and every key range is derived in the kernel
from ``seq_lens``. The decode kernel's grid runs over sequences instead; under programmatic
dependent launch its metadata and the first key tile's cached keys and values from before this
step's new token load before the wait (kernels/fused/pdl.py has the rule), overlapping the
rotary launch; the new token's key and value load after it. Nothing in ``forward`` waits on
the device. The split count is a performance choice only: any value gives the same function, so
a CUDA graph captured at one context length stays correct at another; it is a run-time kernel
argument, so a new count compiles nothing.

Tiles (sm_90, from the compiler's report): decode BLOCK_M=16 / verify 32 or 64 rows with 64-key
tiles, 4 warps, 3 stages (mma.sync at 16/32 rows, wgmma from 64; no spills); prefill
BLOCK_M=128, 8 warps (wgmma). K/V tiles move as 16-byte cp.async copies, the block-table
gather pipelined with them. float32 runs an exact ("ieee") dot on FMA units with 16x16 tiles.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import triton
import triton.language as tl

from outrider.kernels.attention.metadata import AttentionMetadata
from outrider.kernels.attention.torch_ref import TorchAttentionBackend
from outrider.kernels.attention.triton_kv_write import write_kv
from outrider.kernels.fused.dispatch import pdl
from outrider.kernels.fused.pdl import pdl_prologue

LOG2E = 1.4426950408889634
# NOTE: decode/verify tiles are split over the keys until about this many programs per SM run.
# (H200 sweep, CUDA-graph replays, Llama-3.1-8B heads, 4k keys: at batch 1, 64 splits of one
# 64-key tile each ran 12.4 us against 13.4 us with 32 splits of two.)
_PROGRAMS_PER_SM = 4
_MAX_SPLITS = 64
_MIN_KEYS_PER_SPLIT = 64
# NOTE: early_kv_tile programs hold their first K/V tile in registers across the PDL wait
# (sm_90, 16 rows, 64-key tiles: 160 registers against 108, so three 4-warp programs per SM
# instead of four). H200, Llama-3.1-8B decode step at batch 1 and 4k keys (33 splits of two
# tiles), three alternations on one host: 4600-4620 us against 4624-4631 with the plain loop
# (another host's first run: 4534-4544 against 4644-4651). With the tile early at batch 8
# (8 tiles per split, 576 programs) it took 6378-6387 us against 5871-5915, and in 5-token
# verify tiles 5166-5198 against 5047-5073: those keep the plain loop.
_EARLY_PROGRAMS_PER_SM = 3


@triton.jit
def _find_seq(qsl_ptr, num_seqs, tile, BLOCK_Q: tl.constexpr):
    """The sequence b whose tiles start at or before global tile index ``tile``."""
    lo = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        first = (tl.load(qsl_ptr + mid) // BLOCK_Q + mid).to(tl.int32)
        if first <= tile:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _kv_offsets(
    bt_row,
    offs_n,
    n_ok,
    kvh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    BLOCK_SIZE: tl.constexpr,
):
    """Element offsets of keys ``offs_n`` of KV head ``kvh`` in the key and value caches: [N]."""
    blk = tl.load(bt_row + offs_n // BLOCK_SIZE, mask=n_ok, other=0).to(tl.int64)
    in_blk = (offs_n % BLOCK_SIZE).to(tl.int64)
    k_off = blk * stride_kb + in_blk * stride_ks + kvh * stride_kh
    v_off = blk * stride_vb + in_blk * stride_vs + kvh * stride_vh
    return k_off, v_off


@triton.jit
def _softmax_step(
    q,
    k,
    offs_n,
    n_ok,
    row_ok,
    q_pos,
    m_i,
    l_i,
    scale_log2,
    CAUSAL: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """Scores of one key tile ``k [D, N]`` and the online softmax's update: returns the tile's
    weights ``p [M, N]``, the rescale ``alpha [M]`` of what came before, and the new max and sum."""
    s = tl.dot(q, k.to(q.dtype), input_precision=DOT_PREC) * scale_log2  # [M, N]
    mask = row_ok[:, None] & n_ok[None, :]
    if CAUSAL:
        mask = mask & (offs_n[None, :] <= q_pos[:, None])
    s = tl.where(mask, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # NOTE: a row with no visible key yet keeps m = -inf; subtract 0 so exp2 gives 0, not NaN.
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(s - m_use[:, None])
    return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def _cached_tile(
    acc,
    m_i,
    l_i,
    q,
    kc_ptr,
    vc_ptr,
    bt_row,
    start,
    hi,
    kvh,
    offs_d,
    d_ok,
    row_ok,
    q_pos,
    scale_log2,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """Keys ``start .. start + BLOCK_N`` (below ``hi``) read from the paged cache into the
    online softmax: returns the updated ``(acc, m_i, l_i)``."""
    offs_n = start + tl.arange(0, BLOCK_N)  # [N] key positions
    n_ok = offs_n < hi
    k_off, v_off = _kv_offsets(
        bt_row, offs_n, n_ok, kvh,
        stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, BLOCK_SIZE,
    )  # fmt: skip
    kv_mask = n_ok[None, :] & d_ok[:, None]
    k = tl.load(kc_ptr + k_off[None, :] + offs_d[:, None], mask=kv_mask, other=0.0)  # [D, N]
    p, alpha, m_i, l_i = _softmax_step(
        q, k, offs_n, n_ok, row_ok, q_pos, m_i, l_i, scale_log2, CAUSAL, DOT_PREC
    )
    v = tl.load(
        vc_ptr + v_off[:, None] + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0
    )  # [N, D]
    acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=DOT_PREC)
    return acc, m_i, l_i


# NOTE: no value specialisation of the ints that change from step to step (batch size, splits,
# block-table width): an eager caller would otherwise compile a new variant mid-run.
@triton.jit
def _split_range(kv_end, split, num_splits, BLOCK_N: tl.constexpr):
    """Keys ``[lo, hi)`` of split ``split``: whole ``BLOCK_N`` tiles, spread evenly."""
    tiles_per_split = tl.cdiv(tl.cdiv(kv_end, BLOCK_N), num_splits)
    lo = split * tiles_per_split * BLOCK_N
    return lo, tl.minimum(kv_end, lo + tiles_per_split * BLOCK_N)


@triton.jit
def _store_partials(
    part_acc_ptr, part_m_ptr, part_l_ptr, acc, m_i, l_i, tok, head, row_ok, offs_d,
    num_heads, num_splits, split, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """One split's unnormalised rows for ``_reduce_splits_kernel``."""
    base = (tok * num_heads + head) * num_splits + split  # [M]
    tl.store(part_m_ptr + base, m_i, mask=row_ok)
    tl.store(part_l_ptr + base, l_i, mask=row_ok)
    tl.store(part_acc_ptr + base[:, None] * BLOCK_D + offs_d[None, :], acc, mask=row_ok[:, None])


@triton.jit
def _decode_seq(qsl_ptr, seq_lens_ptr, b):
    """Sequence ``b``'s ``(q_start, q_len, seq_len)`` (host-staged metadata: loads that may run
    before the PDL wait)."""
    q_start = tl.load(qsl_ptr + b)
    q_len = (tl.load(qsl_ptr + b + 1) - q_start).to(tl.int32)
    return q_start, q_len, tl.load(seq_lens_ptr + b).to(tl.int32)


@triton.jit
def _decode_rows(
    q_start,
    q_len,
    seq_len,
    kvh,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """A decode program's query tile, all of its sequence's queries (row ``r`` is token
    ``r // GROUP`` and head ``kvh * GROUP + r % GROUP``): returns ``(ctx_len, head [M],
    row_ok [M], tok [M], q_pos [M], offs_d [D], d_ok [D])``."""
    ctx_len = seq_len - q_len
    rows = tl.arange(0, BLOCK_M)
    q_idx = rows // GROUP  # [M] query token inside the sequence
    head = kvh * GROUP + rows % GROUP  # [M] query head
    row_ok = q_idx < q_len
    tok = q_start + q_idx.to(tl.int64)  # [M] packed token index
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    return ctx_len, head, row_ok, tok, ctx_len + q_idx, offs_d, d_ok


@triton.jit
def _first_cached_tile(
    kc_ptr,
    vc_ptr,
    bt_row,
    lo,
    hi,
    ctx_len,
    kvh,
    offs_d,
    d_ok,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """The key tile at ``lo``: its positions ``offs_n [N]``, ``n_ok = offs_n < hi``, the cached
    keys ``k [D, N]`` and values ``v [N, D]`` of positions below ``hi`` and ``ctx_len`` (before
    this step's new tokens, so it may run before the PDL wait; zeros elsewhere) and their
    pointers."""
    offs_n = lo + tl.arange(0, BLOCK_N)  # [N]
    n_ok = offs_n < hi
    k_off, v_off = _kv_offsets(
        bt_row, offs_n, n_ok, kvh,
        stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, BLOCK_SIZE,
    )  # fmt: skip
    k_ptrs = kc_ptr + k_off[None, :] + offs_d[:, None]  # [D, N]
    v_ptrs = vc_ptr + v_off[:, None] + offs_d[None, :]  # [N, D]
    old = offs_n < tl.minimum(hi, ctx_len)
    k = tl.load(k_ptrs, mask=old[None, :] & d_ok[:, None], other=0.0)
    v = tl.load(v_ptrs, mask=old[:, None] & d_ok[None, :], other=0.0)
    return offs_n, n_ok, k, v, k_ptrs, v_ptrs


@triton.jit(do_not_specialize=["num_seqs", "num_splits", "stride_bt"])
def _paged_attn_kernel(
    q_ptr,
    kc_ptr,
    vc_ptr,
    out_ptr,
    part_acc_ptr,
    part_m_ptr,
    part_l_ptr,
    qsl_ptr,
    seq_lens_ptr,
    bt_ptr,
    num_seqs,
    num_heads,
    num_splits,
    scale_log2,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
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
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr,
    CAUSAL: tl.constexpr,
    DOT_PREC: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pdl_prologue(USE_PDL)
    tile = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)

    b = _find_seq(qsl_ptr, num_seqs, tile, BLOCK_Q)
    q_start = tl.load(qsl_ptr + b)
    q_len = (tl.load(qsl_ptr + b + 1) - q_start).to(tl.int32)
    qb = tile - (q_start // BLOCK_Q + b).to(tl.int32)  # tile index inside the sequence
    if qb * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + b).to(tl.int32)
    ctx_len = seq_len - q_len  # keys before the first query token

    rows = tl.arange(0, BLOCK_M)
    q_idx = qb * BLOCK_Q + rows // GROUP  # [M] query token inside the sequence
    head = kvh * GROUP + rows % GROUP  # [M] query head
    row_ok = (rows // GROUP < BLOCK_Q) & (q_idx < q_len)
    tok = q_start + q_idx.to(tl.int64)  # [M] packed token index
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM

    q = tl.load(
        q_ptr + tok[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
        mask=row_ok[:, None] & d_ok[None, :],
        other=0.0,
    )  # [M, D]
    q_pos = ctx_len + q_idx  # [M] absolute position of each row's token

    if CAUSAL:
        kv_end = tl.minimum(seq_len, ctx_len + tl.minimum(q_len, (qb + 1) * BLOCK_Q))
    else:
        kv_end = seq_len
    if SPLIT:
        lo, hi = _split_range(kv_end, split, num_splits, BLOCK_N)
    else:
        lo = 0
        hi = kv_end

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    bt_row = bt_ptr + b.to(tl.int64) * stride_bt
    for start in range(lo, hi, BLOCK_N):
        acc, m_i, l_i = _cached_tile(
            acc, m_i, l_i, q, kc_ptr, vc_ptr, bt_row, start, hi, kvh, offs_d, d_ok, row_ok, q_pos,
            scale_log2, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
            BLOCK_SIZE, BLOCK_N, CAUSAL, DOT_PREC,
        )  # fmt: skip

    if not SPLIT:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(
            out_ptr + tok[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=row_ok[:, None] & d_ok[None, :],
        )
    else:
        _store_partials(
            part_acc_ptr, part_m_ptr, part_l_ptr, acc, m_i, l_i, tok, head, row_ok, offs_d,
            num_heads, num_splits, split, BLOCK_D,
        )  # fmt: skip


@triton.jit(do_not_specialize=["num_splits", "stride_bt"])
def _paged_decode_early_kernel(
    q_ptr,
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
    stride_qh,
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
    CAUSAL: tl.constexpr,
    DOT_PREC: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """``early_kv_tile``'s programs: one per (sequence, KV head, split), each sequence's queries
    in one tile, partial outputs for ``_reduce_splits_kernel``. The split's first key tile is
    loaded before the PDL wait, except the keys of this step's new tokens."""
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
    lo, hi = _split_range(seq_len, split, num_splits, BLOCK_N)
    bt_row = bt_ptr + b.to(tl.int64) * stride_bt
    offs_n, n_ok, k, v, k_ptrs, v_ptrs = _first_cached_tile(
        kc_ptr, vc_ptr, bt_row, lo, hi, ctx_len, kvh, offs_d, d_ok,
        stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, BLOCK_SIZE, BLOCK_N,
    )  # fmt: skip
    pdl_prologue(USE_PDL)
    new = n_ok & (offs_n >= ctx_len)
    k = tl.load(k_ptrs, mask=new[None, :] & d_ok[:, None], other=k)
    v = tl.load(v_ptrs, mask=new[:, None] & d_ok[None, :], other=v)
    q = tl.load(
        q_ptr + tok[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
        mask=row_ok[:, None] & d_ok[None, :],
        other=0.0,
    )  # [M, D]
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    p, alpha, m_i, l_i = _softmax_step(
        q, k, offs_n, n_ok, row_ok, q_pos, m_i, l_i, scale_log2, CAUSAL, DOT_PREC
    )
    acc = tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=DOT_PREC)  # [M, D]
    for start in range(lo + BLOCK_N, hi, BLOCK_N):
        acc, m_i, l_i = _cached_tile(
            acc, m_i, l_i, q, kc_ptr, vc_ptr, bt_row, start, hi, kvh, offs_d, d_ok, row_ok, q_pos,
            scale_log2, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
            BLOCK_SIZE, BLOCK_N, CAUSAL, DOT_PREC,
        )  # fmt: skip

    _store_partials(
        part_acc_ptr, part_m_ptr, part_l_ptr, acc, m_i, l_i, tok, head, row_ok, offs_d,
        num_heads, num_splits, split, BLOCK_D,
    )  # fmt: skip


@triton.jit(do_not_specialize=["num_splits"])
def _reduce_splits_kernel(
    out_ptr,
    part_acc_ptr,
    part_m_ptr,
    part_l_ptr,
    num_heads,
    num_splits,
    stride_ot,
    stride_oh,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SPLITS_P2: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pdl_prologue(USE_PDL)
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    offs_s = tl.arange(0, SPLITS_P2)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < num_splits
    base = (t * num_heads + h) * num_splits + offs_s  # [S]
    m = tl.load(part_m_ptr + base, mask=s_ok, other=float("-inf"))
    l_s = tl.load(part_l_ptr + base, mask=s_ok, other=0.0)
    m_max = tl.max(m, 0)
    w = tl.exp2(m - tl.where(m_max == float("-inf"), 0.0, m_max))  # [S]; empty splits -> 0
    acc = tl.load(
        part_acc_ptr + base[:, None] * BLOCK_D + offs_d[None, :], mask=s_ok[:, None], other=0.0
    )
    den = tl.sum(w * l_s, 0)
    out = tl.sum(acc * w[:, None], 0) / tl.where(den == 0.0, 1.0, den)  # [D]
    tl.store(
        out_ptr + t * stride_ot + h * stride_oh + offs_d,
        out.to(out_ptr.dtype.element_ty),
        mask=offs_d < HEAD_DIM,
    )


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the Triton interpreter on CPU: a few programs keep the tests quick


def _tile_config(max_q: int, group: int, hd: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for a batch whose longest query is max_q."""
    rows = max_q * group
    block_m = 16 if rows <= 16 else 32 if rows <= 32 else 64 if rows <= 64 else 128
    block_m = max(block_m, triton.next_power_of_2(group))
    block_d = triton.next_power_of_2(hd)
    if dtype == torch.float32:
        # NOTE: the float32 path (exact "ieee" dot, a test and CPU-parity path) runs on FMA
        # units; small tiles keep it out of local memory (no spills at hd 128, sm_90).
        return max(16, triton.next_power_of_2(group)), 16, 4, 2
    block_n = 64 if block_d <= 128 else 32
    num_warps = 8 if block_m >= 128 else 4
    # NOTE: decode tiles (block_m 16) loop over few key tiles per split: two stages (H200, 4k
    # keys: 47.6 us against 57.0 at batch 8, 286 against 311 at batch 64); verify tiles
    # (block_m 32, 64) lost with two (75.7 us against 65.5 at batch 8) and keep three.
    stages = 2 if block_m <= 16 or block_d > 128 else 3
    return block_m, block_n, num_warps, stages


def early_kv_tile(
    md: AttentionMetadata,
    n_kv: int,
    block_m: int,
    block_q: int,
    block_n: int,
    num_splits: int,
    device: torch.device,
    programs_per_sm: int = _EARLY_PROGRAMS_PER_SM,
) -> bool:
    """Whether the kernel loads its first key tile's cached K/V before the PDL wait: decode
    tiles (at most 16 rows, one query tile per sequence) whose splits hold at most two key tiles
    at ``md.max_seq_len``, with every program resident at once (``programs_per_sm``). Longer
    contexts stay correct (the rest of a split loops after the wait)."""
    if block_m > 16 or num_splits <= 1 or md.max_query_len > block_q:
        return False
    tiles = triton.cdiv(max(md.max_seq_len, 1), block_n)
    per_split = triton.cdiv(tiles, num_splits)
    programs = md.num_seqs * n_kv * triton.cdiv(tiles, per_split)
    return per_split <= 2 and programs <= programs_per_sm * _sm_count(device)


def _num_splits(
    device: torch.device, work_tiles: int, n_kv: int, max_seq_len: int, block_n: int
) -> int:
    target = _PROGRAMS_PER_SM * _sm_count(device)
    have = max(work_tiles * n_kv, 1)
    if have >= target:
        return 1
    by_len = triton.cdiv(max(max_seq_len, 1), max(_MIN_KEYS_PER_SPLIT, block_n))
    return max(1, min(triton.cdiv(target, have), by_len, _MAX_SPLITS))


def paged_attention(
    q: torch.Tensor,  # [T, nH, hd]
    k_cache: torch.Tensor,  # [N, bs, nKV, hd]
    v_cache: torch.Tensor,  # [N, bs, nKV, hd]
    md: AttentionMetadata,
    scale: float,
    *,
    out: torch.Tensor | None = None,  # [T, nH, hd], written in full
    num_splits: int | None = None,  # None: chosen from the batch geometry
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> torch.Tensor:
    """Attend packed queries over the paged cache (new K/V must already be written)."""
    t, n_heads, hd = q.shape
    n_kv = k_cache.shape[2]
    b = md.num_seqs
    if n_heads % n_kv:
        raise ValueError(f"query heads ({n_heads}) must be a multiple of KV heads ({n_kv})")
    if out is None:
        out = torch.empty((t, n_heads, hd), dtype=q.dtype, device=q.device)
    if t == 0 or b == 0:
        return out
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1 or out.stride(-1) != 1:
        raise ValueError("q, the KV cache and out need a contiguous last dimension")
    group = n_heads // n_kv
    block_m, bn, nw, ns = _tile_config(max(md.max_query_len, 1), group, hd, q.dtype)
    block_n = block_n or bn
    num_warps = num_warps or nw
    num_stages = num_stages or ns
    block_q = block_m // group
    block_d = triton.next_power_of_2(hd)
    if num_splits is None:
        num_splits = (
            _num_splits(q.device, b, n_kv, md.max_seq_len, block_n)
            if md.max_query_len <= block_q
            else 1
        )
    dev = q.device
    qsl = md.query_start_loc.to(dev)
    seq_lens = md.seq_lens.to(dev)
    tables = md.block_tables.to(dev)
    if num_splits > 1:
        part_acc, part_m, part_l = split_scratch(md, t, n_heads, num_splits, block_d, dev)
    else:
        part_acc = part_m = part_l = out  # unused
    use_pdl = pdl(q)
    cache_strides = (*k_cache.stride()[:3], *v_cache.stride()[:3], tables.stride(0))
    common: dict[str, Any] = dict(
        BLOCK_SIZE=k_cache.shape[1],
        GROUP=group,
        HEAD_DIM=hd,
        BLOCK_D=block_d,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        CAUSAL=bool(md.causal),
        DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32",
        USE_PDL=use_pdl,
        launch_pdl=use_pdl,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    parts = (part_acc, part_m, part_l, qsl, seq_lens, tables)
    if early_kv_tile(md, n_kv, block_m, block_q, block_n, num_splits, q.device):
        _paged_decode_early_kernel[(b, n_kv, num_splits)](
            q, k_cache, v_cache, *parts, n_heads, num_splits, scale * LOG2E,
            q.stride(0), q.stride(1), *cache_strides, **common,
        )  # fmt: skip
    else:
        _paged_attn_kernel[(t // block_q + b, n_kv, num_splits)](
            q, k_cache, v_cache, out, *parts, b, n_heads, num_splits, scale * LOG2E,
            q.stride(0), q.stride(1), out.stride(0), out.stride(1), *cache_strides,
            BLOCK_Q=block_q, SPLIT=num_splits > 1, **common,
        )  # fmt: skip
    if num_splits > 1:
        reduce_splits(out, part_acc, part_m, part_l, num_splits)
    return out


def split_scratch(
    md: AttentionMetadata, t: int, n_heads: int, num_splits: int, block_d: int, dev: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The split kernels' partial rows ``(acc [T, nH, S, D], m [T, nH, S], l [T, nH, S])``."""
    # NOTE: the scratch lives in the metadata, so every layer of one forward reuses it.
    state = md.backend_state.setdefault("triton", {})
    key = ("splits", t, n_heads, num_splits, block_d, dev)
    bufs = state.get(key)
    if bufs is None:
        bufs = (
            torch.empty((t, n_heads, num_splits, block_d), dtype=torch.float32, device=dev),
            torch.empty((t, n_heads, num_splits), dtype=torch.float32, device=dev),
            torch.empty((t, n_heads, num_splits), dtype=torch.float32, device=dev),
        )
        state[key] = bufs
    return bufs


def reduce_splits(
    out: torch.Tensor,  # [T, nH, hd], written in full
    part_acc: torch.Tensor,  # [T, nH, S, D]
    part_m: torch.Tensor,  # [T, nH, S]
    part_l: torch.Tensor,  # [T, nH, S]
    num_splits: int,
) -> None:
    """Merge the splits' partial rows into ``out`` (one launch)."""
    t, n_heads, hd = out.shape
    block_d = part_acc.shape[-1]
    use_pdl = pdl(out)
    _reduce_splits_kernel[(t, n_heads)](
        out,
        part_acc,
        part_m,
        part_l,
        n_heads,
        num_splits,
        out.stride(0),
        out.stride(1),
        HEAD_DIM=hd,
        BLOCK_D=block_d,
        SPLITS_P2=max(_MAX_SPLITS, triton.next_power_of_2(num_splits)),
        USE_PDL=use_pdl,
        launch_pdl=use_pdl,
        num_warps=2 if block_d <= 64 else 4,
    )


def warm_up_variants(
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device,
    causal: tuple[bool, ...] = (True,),
) -> int:
    """Launch ``paged_attention`` at query lengths on both sides of every BLOCK_M tier, over
    one key tile, a few and many, in each ``causal`` mode, on a scratch cache, and the
    one-launch decode of ``paged_attention_rotary`` (``warm_up_rotary``):
    every tile variant the launcher can pick for these shapes is compiled (Triton skips the
    ones it has), so none is compiled on first use in the middle of a request (hundreds of ms
    each). Returns the number of launches."""
    group = num_heads // num_kv_heads
    # NOTE: rows = query length x group; the tiers end at 16, 32, 64 and 128 rows.
    lens = sorted({max(1, r // group + d) for r in (1, 16, 32, 64, 128) for d in (0, 1)})
    # NOTE: a few tiles (split, decode tiles early: early_kv_tile), and more tiles per split
    # than early_kv_tile takes (split, plain loop).
    mid_keys = 2 * _MIN_KEYS_PER_SPLIT
    long_keys = 3 * _MAX_SPLITS * _MIN_KEYS_PER_SPLIT
    num_blocks = -(-(lens[-1] + long_keys) // block_size)
    k_cache = torch.zeros(
        (num_blocks, block_size, num_kv_heads, head_dim), dtype=dtype, device=device
    )
    v_cache = torch.zeros_like(k_cache)
    table = torch.arange(num_blocks, dtype=torch.int64, device=device).view(1, num_blocks)
    count = 0
    for q_len in lens:
        q = torch.zeros((q_len, num_heads, head_dim), dtype=dtype, device=device)
        for keys in (q_len, q_len + mid_keys, q_len + long_keys):
            for c in causal:
                md = AttentionMetadata(
                    slot_mapping=torch.full((q_len,), -1, dtype=torch.int64, device=device),
                    query_start_loc=torch.tensor([0, q_len], dtype=torch.int64, device=device),
                    seq_lens=torch.tensor([keys], dtype=torch.int64, device=device),
                    block_tables=table,
                    max_query_len=q_len,
                    max_seq_len=keys,
                    causal=c,
                )
                paged_attention(q, k_cache, v_cache, md, 1.0)
                count += 1
    from outrider.kernels.attention.triton_decode_rotary import warm_up_rotary

    args = (num_heads, num_kv_heads, head_dim, block_size, dtype, device, causal)
    return count + warm_up_rotary(*args)


class TritonAttentionBackend(TorchAttentionBackend):
    """The ``triton`` attention backend: paged KV write plus paged attention, CUDA only."""

    name = "triton"
    supports_non_causal = True
    cuda_graph_safe = True
    write_kv = staticmethod(write_kv)
    attend = staticmethod(paged_attention)

    warm_up = staticmethod(warm_up_variants)

    @staticmethod
    def attend_rotary(*args: Any, **kwargs: Any) -> torch.Tensor:
        """``triton_decode_rotary.paged_attention_rotary``: the rotary, the KV write and the
        attention, as one launch at decode (see there)."""
        from outrider.kernels.attention.triton_decode_rotary import paged_attention_rotary

        return paged_attention_rotary(*args, **kwargs)


BACKEND = TritonAttentionBackend()
