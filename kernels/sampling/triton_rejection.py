"""Triton rejection samplers (strict and probabilistic) that match the torch reference exactly.

Given the same random numbers, every output equals ``torch_ref.rejection_sample`` and
``torch_ref.rejection_sample_strict`` bit for bit: the same accept rule
(``p(d) > 0 and u <= p(d) / q(d)`` with q one-hot when no draft probabilities are given), the
same recovered token (``argmax(max(p - q, 0) / noise)`` over positive weights, ``argmax(p / noise)``
when no weight is positive, the first index on ties) and the bonus token when every draft is
accepted. Divisions are IEEE round-to-nearest (``tl.math.div_rn``; Triton's plain float32 ``/``
is an approximate division on NVIDIA GPUs), comparisons and subtractions are exact, so the
float32 arithmetic is the reference's.

Kernels:

* ``_strict_kernel``: one program per row; the whole row of K drafts fits one tile.
* ``_recover_chunk_kernel``: grid (B, cdiv(V, BLOCK_V)). Each program recomputes its row's
  accepted prefix (K gathers), program (b, 0) stores it, and when the row was rejected the
  program scans one vocabulary chunk of the rejected position for the two candidate argmaxes
  (over max(p - q, 0) and over p) and stores (best score, first index) for each. The vocabulary
  scan reads p, q and the noise once, spread over many programs so small batches still use the
  whole GPU's bandwidth.
* ``_finalize_kernel``: one program per row merges the chunk winners (largest score, then the
  smallest index) and writes the output row: accepted drafts, then the recovered or bonus token,
  then -1.

The samplers that draw tokens (``sample``, ``sample_from_probs``, ``compute_probs``) are the
torch reference's: they are a few vectorised torch ops already.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from outrider.kernels.sampling.torch_ref import PLACEHOLDER_TOKEN_ID, TorchSamplingBackend

_BLOCK_V = 4096  # vocabulary entries per program of the recovery scan
_INDEX_SENTINEL = 2**31 - 1


@triton.jit
def _strict_kernel(
    draft_ptr,
    n_ptr,
    target_ptr,
    out_ptr,
    acc_ptr,
    stride_db,
    stride_dk,
    stride_tb,
    stride_tk,
    stride_ob,
    stride_ok,
    K,
    BLOCK_K: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_K)
    in_k = offs < K
    n = tl.load(n_ptr + b)
    d = tl.load(draft_ptr + b * stride_db + offs * stride_dk, mask=in_k, other=-1).to(tl.int64)
    t = tl.load(target_ptr + b * stride_tb + offs * stride_tk, mask=offs <= K, other=-1)
    t = t.to(tl.int64)
    match = in_k & (offs < n) & (d == t)
    num_acc = tl.min(tl.where(match, BLOCK_K, offs), 0)  # first position that is not a match
    out = tl.where(offs <= num_acc, t, -1)
    tl.store(out_ptr + b * stride_ob + offs * stride_ok, out, mask=offs <= K)
    tl.store(acc_ptr + b, num_acc.to(tl.int64))


@triton.jit
def _div(a, b, FP64: tl.constexpr):
    if FP64:
        r = a / b  # float64 division is round-to-nearest (div.rn.f64)
    else:
        r = tl.math.div_rn(a, b)
    return r


@triton.jit
def _accepted_prefix(
    draft_ptr,
    n_ptr,
    q_ptr,
    p_ptr,
    u_ptr,
    b,
    K,
    stride_db,
    stride_dk,
    stride_qb,
    stride_qk,
    stride_qv,
    stride_pb,
    stride_pk,
    stride_pv,
    stride_ub,
    stride_uk,
    HAS_Q: tl.constexpr,
    FP64: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """(number of accepted drafts, number of drafts) of row b."""
    ct = tl.float64 if FP64 else tl.float32
    offs = tl.arange(0, BLOCK_K)
    n = tl.load(n_ptr + b)
    valid = (offs < K) & (offs < n)
    d = tl.load(draft_ptr + b * stride_db + offs * stride_dk, mask=valid, other=0).to(tl.int64)
    p_d = tl.load(
        p_ptr + b * stride_pb + offs * stride_pk + d * stride_pv, mask=valid, other=0.0
    ).to(ct)
    if HAS_Q:
        q_d = tl.load(
            q_ptr + b * stride_qb + offs * stride_qk + d * stride_qv, mask=valid, other=1.0
        ).to(ct)
    else:
        q_d = tl.full([BLOCK_K], 1.0, ct)
    u = tl.load(u_ptr + b * stride_ub + offs * stride_uk, mask=valid, other=1.0).to(ct)
    accept = valid & (p_d > 0) & (u <= _div(p_d, q_d, FP64))
    num_acc = tl.min(tl.where(accept, BLOCK_K, offs), 0)  # first rejected (or padded) position
    return num_acc, n


@triton.jit
def _recover_chunk_kernel(
    draft_ptr,
    n_ptr,
    q_ptr,
    p_ptr,
    u_ptr,
    noise_ptr,
    acc_ptr,
    part_val_ptr,
    part_idx_ptr,
    K,
    V,
    num_chunks,
    stride_db,
    stride_dk,
    stride_qb,
    stride_qk,
    stride_qv,
    stride_pb,
    stride_pk,
    stride_pv,
    stride_ub,
    stride_uk,
    stride_nb,
    stride_nk,
    stride_nv,
    HAS_Q: tl.constexpr,
    FP64: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    ct = tl.float64 if FP64 else tl.float32
    num_acc, n = _accepted_prefix(
        draft_ptr, n_ptr, q_ptr, p_ptr, u_ptr, b, K,
        stride_db, stride_dk, stride_qb, stride_qk, stride_qv, stride_pb, stride_pk, stride_pv,
        stride_ub, stride_uk, HAS_Q, FP64, BLOCK_K,
    )  # fmt: skip
    if chunk == 0:
        tl.store(acc_ptr + b, num_acc.to(tl.int64))
    if num_acc >= n:
        return  # every draft accepted: the bonus token, no recovery
    pos = num_acc.to(tl.int64)  # first rejected position (< n <= K)
    d = tl.load(draft_ptr + b * stride_db + pos * stride_dk).to(tl.int64)
    offs_v = chunk * BLOCK_V + tl.arange(0, BLOCK_V)
    in_v = offs_v < V
    offs_v64 = offs_v.to(tl.int64)
    p = tl.load(
        p_ptr + b * stride_pb + pos * stride_pk + offs_v64 * stride_pv, mask=in_v, other=0.0
    ).to(ct)
    if HAS_Q:
        q = tl.load(
            q_ptr + b * stride_qb + pos * stride_qk + offs_v64 * stride_qv, mask=in_v, other=0.0
        ).to(ct)
        w = tl.maximum(p - q, 0.0)
    else:
        w = tl.where(offs_v64 == d, 0.0, p)  # max(p - onehot(d), 0)
    e = tl.load(
        noise_ptr + b * stride_nb + pos * stride_nk + offs_v64 * stride_nv, mask=in_v, other=1.0
    ).to(ct)
    score_w = tl.where(in_v, tl.where(w > 0, _div(w, e, FP64), -1.0), float("-inf"))
    score_p = tl.where(in_v, tl.where(p > 0, _div(p, e, FP64), -1.0), float("-inf"))
    best_w = tl.max(score_w, 0)
    best_p = tl.max(score_p, 0)
    idx_w = tl.min(tl.where(score_w == best_w, offs_v, 2147483647), 0)
    idx_p = tl.min(tl.where(score_p == best_p, offs_v, 2147483647), 0)
    base = (b * num_chunks + chunk) * 2
    tl.store(part_val_ptr + base, best_w.to(tl.float64))
    tl.store(part_val_ptr + base + 1, best_p.to(tl.float64))
    tl.store(part_idx_ptr + base, idx_w)
    tl.store(part_idx_ptr + base + 1, idx_p)


@triton.jit
def _finalize_kernel(
    draft_ptr,
    n_ptr,
    bonus_ptr,
    acc_ptr,
    part_val_ptr,
    part_idx_ptr,
    out_ptr,
    K,
    num_chunks,
    stride_db,
    stride_dk,
    stride_ob,
    stride_ok,
    BLOCK_K1: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    n = tl.load(n_ptr + b)
    num_acc = tl.load(acc_ptr + b)
    offs = tl.arange(0, BLOCK_K1)
    d = tl.load(draft_ptr + b * stride_db + offs * stride_dk, mask=offs < K, other=-1)
    last = tl.load(bonus_ptr + b).to(tl.int64)
    if num_acc < n:
        offs_c = tl.arange(0, BLOCK_C)
        in_c = offs_c < num_chunks
        base = (b * num_chunks + offs_c) * 2
        val_w = tl.load(part_val_ptr + base, mask=in_c, other=float("-inf"))
        val_p = tl.load(part_val_ptr + base + 1, mask=in_c, other=float("-inf"))
        idx_w = tl.load(part_idx_ptr + base, mask=in_c, other=2147483647)
        idx_p = tl.load(part_idx_ptr + base + 1, mask=in_c, other=2147483647)
        top_w = tl.max(val_w, 0)
        top_p = tl.max(val_p, 0)
        rec_w = tl.min(tl.where(val_w == top_w, idx_w, 2147483647), 0)
        rec_p = tl.min(tl.where(val_p == top_p, idx_p, 2147483647), 0)
        # NOTE: a positive weight scores >= 0, a non-positive one -1: top_w < 0 means no mass.
        last = tl.where(top_w >= 0, rec_w, rec_p).to(tl.int64)
    out = tl.where(offs < num_acc, d.to(tl.int64), tl.where(offs == num_acc, last, -1))
    tl.store(out_ptr + b * stride_ob + offs * stride_ok, out, mask=offs <= K)


def rejection_sample_strict(
    draft_token_ids: torch.Tensor,  # [B, K] int, padded with -1
    num_draft_tokens: torch.Tensor,  # [B] int, 0..K
    target_token_ids: torch.Tensor,  # [B, K+1] int
    *,
    out: torch.Tensor | None = None,  # [B, K+1] int64
    num_accepted: torch.Tensor | None = None,  # [B] int64
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of ``torch_ref.rejection_sample_strict``."""
    b, k = draft_token_ids.shape
    device = draft_token_ids.device
    if out is None:
        out = torch.empty((b, k + 1), dtype=torch.int64, device=device)
    if num_accepted is None:
        num_accepted = torch.empty((b,), dtype=torch.int64, device=device)
    if b == 0:
        return out, num_accepted
    n = num_draft_tokens.to(device=device, dtype=torch.int64)
    targets = target_token_ids.to(device)
    _strict_kernel[(b,)](
        draft_token_ids,
        n,
        targets,
        out,
        num_accepted,
        draft_token_ids.stride(0),
        draft_token_ids.stride(1),
        targets.stride(0),
        targets.stride(1),
        out.stride(0),
        out.stride(1),
        k,
        BLOCK_K=triton.next_power_of_2(k + 1),
        num_warps=1,
    )
    return out, num_accepted


def rejection_sample(
    draft_token_ids: torch.Tensor,  # [B, K] int, padded with -1
    num_draft_tokens: torch.Tensor,  # [B] int, 0..K
    draft_probs: torch.Tensor | None,  # [B, K, V] q; None = one-hot at the draft token
    target_probs: torch.Tensor,  # [B, K+1, V] p (or [B, K, V])
    uniforms: torch.Tensor,  # [B, K] U[0, 1)
    recovered_noise: torch.Tensor,  # [B, K, V] or [B, V] Exp(1)
    bonus_token_ids: torch.Tensor,  # [B] int
    *,
    out: torch.Tensor | None = None,  # [B, K+1] int64
    num_accepted: torch.Tensor | None = None,  # [B] int64
    block_v: int = _BLOCK_V,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of ``torch_ref.rejection_sample``: same inputs, the same tokens."""
    b, k = draft_token_ids.shape
    device = draft_token_ids.device
    v = target_probs.shape[-1]
    if out is None:
        out = torch.empty((b, k + 1), dtype=torch.int64, device=device)
    if num_accepted is None:
        num_accepted = torch.empty((b,), dtype=torch.int64, device=device)
    if b == 0:
        return out, num_accepted
    n = num_draft_tokens.to(device=device, dtype=torch.int64)
    bonus = bonus_token_ids.to(device=device)
    if k == 0:
        out.copy_(bonus.view(b, 1))
        num_accepted.zero_()
        return out, num_accepted
    fp64 = target_probs.dtype == torch.float64
    if recovered_noise.dim() == 2:
        noise_strides = (recovered_noise.stride(0), 0, recovered_noise.stride(1))
    else:
        noise_strides = tuple(recovered_noise.stride())
    q = draft_probs if draft_probs is not None else target_probs  # unread when HAS_Q is False
    block_v = min(block_v, max(triton.next_power_of_2(v), 16))
    num_chunks = triton.cdiv(v, block_v)
    # NOTE: scores are kept in float64 (exact for float32 and float64); indices in int32.
    part_val = torch.empty((b, num_chunks, 2), dtype=torch.float64, device=device)
    part_idx = torch.empty((b, num_chunks, 2), dtype=torch.int32, device=device)
    block_k = triton.next_power_of_2(k)
    _recover_chunk_kernel[(b, num_chunks)](
        draft_token_ids,
        n,
        q,
        target_probs,
        uniforms,
        recovered_noise,
        num_accepted,
        part_val,
        part_idx,
        k,
        v,
        num_chunks,
        draft_token_ids.stride(0),
        draft_token_ids.stride(1),
        q.stride(0),
        q.stride(1),
        q.stride(2),
        target_probs.stride(0),
        target_probs.stride(1),
        target_probs.stride(2),
        uniforms.stride(0),
        uniforms.stride(1),
        *noise_strides,
        HAS_Q=draft_probs is not None,
        FP64=fp64,
        BLOCK_K=block_k,
        BLOCK_V=block_v,
        num_warps=8 if block_v >= 2048 else 4,
    )
    _finalize_kernel[(b,)](
        draft_token_ids,
        n,
        bonus,
        num_accepted,
        part_val,
        part_idx,
        out,
        k,
        num_chunks,
        draft_token_ids.stride(0),
        draft_token_ids.stride(1),
        out.stride(0),
        out.stride(1),
        BLOCK_K1=triton.next_power_of_2(k + 1),
        BLOCK_C=triton.next_power_of_2(num_chunks),
        num_warps=1 if num_chunks <= 64 else 4,
    )
    return out, num_accepted


assert PLACEHOLDER_TOKEN_ID == -1  # the kernels write -1 literally


class TritonSamplingBackend(TorchSamplingBackend):
    """The ``triton`` sampling backend: Triton rejection samplers, torch token samplers."""

    name = "triton"
    rejection_sample_strict = staticmethod(rejection_sample_strict)
    rejection_sample = staticmethod(rejection_sample)


BACKEND = TritonSamplingBackend()
