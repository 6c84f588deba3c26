"""Triton MoE routing (softmax → top-k → renormalise) and the block alignment of the pairs.

* ``_topk_softmax_kernel``: one program per tile of tokens computes ``torch_ref.select_experts``
  in one launch (``softmax_topk``, which the one-token path in ``triton_moe_token.py`` shares):
  float32 softmax over the experts, the top k by repeated argmax (the smallest expert index wins
  a tie), and the optional renormalisation of the k weights.
* ``_align_kernel``: one program groups the ``T * k`` token-expert pairs by expert into blocks
  of ``BLOCK_M`` rows, exactly as ``torch_ref.align_block_size``: per-expert counts, block
  offsets (a cumsum over experts), ``expert_ids`` per block, then each pair's slot (its expert's
  first slot plus its rank among that expert's pairs, from a cumsum over the pairs of a chunk
  and a running count) and the padding. Every slot is written exactly once.

The output sizes are functions of host integers (``torch_ref.max_num_blocks``), so neither
launch waits on the device and both can be captured in a CUDA graph. The single alignment
program walks the pairs in chunks; past ``_MAX_TRITON_ALIGN_PAIRS`` pairs (large prefills, where
the GEMMs dominate anyway) the sort-based torch version runs instead, with the same result.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from outrider.kernels.moe.torch_ref import align_block_size as align_block_size_torch
from outrider.kernels.moe.torch_ref import max_num_blocks

_MAX_TRITON_ALIGN_PAIRS = 4096
_ALIGN_TILE = 16384  # elements of one [pairs, experts] one-hot tile in the alignment kernel


@triton.jit
def softmax_topk(
    logits,
    row_ok,
    cols,
    col_ok,
    TOP_K: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``torch_ref.select_experts`` of float32 ``logits [BT, BE]`` (``-inf`` past the experts):
    ``(top_w [BT, BLOCK_K] float32, top_i [BT, BLOCK_K] int32)``, columns past ``TOP_K`` zero."""
    row_max = tl.max(logits, axis=1)
    row_max = tl.where(row_ok, row_max, 0.0)  # rows past the end stay finite
    p = tl.exp(logits - row_max[:, None])
    total = tl.where(row_ok, tl.sum(p, axis=1), 1.0)
    probs = p / total[:, None]
    # NOTE: padding columns sit below every probability, so they are never picked.
    probs = tl.where(col_ok[None, :], probs, -1.0)
    kcols = tl.arange(0, BLOCK_K)
    top_w = tl.zeros((logits.shape[0], BLOCK_K), dtype=tl.float32)
    top_i = tl.zeros((logits.shape[0], BLOCK_K), dtype=tl.int32)
    for j in tl.static_range(TOP_K):
        best = tl.max(probs, axis=1)  # [BT]
        idx = tl.min(tl.where(probs == best[:, None], cols[None, :], logits.shape[1]), axis=1)
        top_w = tl.where(kcols[None, :] == j, best[:, None], top_w)
        top_i = tl.where(kcols[None, :] == j, idx[:, None], top_i)
        probs = tl.where(cols[None, :] == idx[:, None], -2.0, probs)
    if RENORMALIZE:
        top_w = top_w / tl.where(row_ok, tl.sum(top_w, axis=1), 1.0)[:, None]
    return top_w, top_i


@triton.jit
def _topk_softmax_kernel(
    logits_ptr,
    weights_ptr,
    ids_ptr,
    num_tokens,
    num_experts,
    stride_lt,
    TOP_K: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < num_tokens
    cols = tl.arange(0, BLOCK_E)
    col_ok = cols < num_experts
    ptrs = logits_ptr + rows[:, None].to(tl.int64) * stride_lt + cols[None, :]
    logits = tl.load(ptrs, mask=row_ok[:, None] & col_ok[None, :], other=float("-inf"))
    logits = tl.where(col_ok[None, :], logits.to(tl.float32), float("-inf"))  # [BT, BE]
    top_w, top_i = softmax_topk(logits, row_ok, cols, col_ok, TOP_K, RENORMALIZE, BLOCK_K)
    kcols = tl.arange(0, BLOCK_K)
    out = rows[:, None].to(tl.int64) * TOP_K + kcols[None, :]
    mask = row_ok[:, None] & (kcols[None, :] < TOP_K)
    tl.store(weights_ptr + out, top_w, mask=mask)
    tl.store(ids_ptr + out, top_i.to(tl.int64), mask=mask)


def select_experts(
    router_logits: torch.Tensor,  # [T, E]
    top_k: int,
    renormalize: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch_ref.select_experts`` in one launch: ``topk_weights [T, k]`` float32 and
    ``topk_ids [T, k]`` int64, the k largest probabilities in decreasing order."""
    num_tokens, num_experts = router_logits.shape
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"`top_k` must be in [1, {num_experts}], got {top_k}")
    dev = router_logits.device
    weights = torch.empty((num_tokens, top_k), dtype=torch.float32, device=dev)
    ids = torch.empty((num_tokens, top_k), dtype=torch.int64, device=dev)
    if num_tokens == 0:
        return weights, ids
    if router_logits.stride(-1) != 1:
        router_logits = router_logits.contiguous()
    block_e = triton.next_power_of_2(num_experts)
    block_t = max(1, min(16, 4096 // block_e, triton.next_power_of_2(num_tokens)))
    _topk_softmax_kernel[(triton.cdiv(num_tokens, block_t),)](
        router_logits,
        weights,
        ids,
        num_tokens,
        num_experts,
        router_logits.stride(0),
        TOP_K=top_k,
        RENORMALIZE=renormalize,
        BLOCK_T=block_t,
        BLOCK_E=block_e,
        BLOCK_K=triton.next_power_of_2(top_k),
        num_warps=4,
    )
    return weights, ids


@triton.jit
def _align_kernel(
    topk_ids_ptr,
    sorted_ptr,
    expert_ids_ptr,
    num_pairs,
    num_experts,
    num_blocks,
    BLOCK_M: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    experts = tl.arange(0, BLOCK_E)
    offs_p = tl.arange(0, BLOCK_P)
    # 1. pairs per expert
    counts = tl.zeros((BLOCK_E,), dtype=tl.int32)
    for p0 in range(0, num_pairs, BLOCK_P):
        pair = p0 + offs_p
        ids = tl.load(topk_ids_ptr + pair, mask=pair < num_pairs, other=-1).to(tl.int32)
        counts += tl.sum((ids[:, None] == experts[None, :]).to(tl.int32), axis=0)
    # 2. each expert's blocks: [block_start, block_end)
    blocks = (counts + BLOCK_M - 1) // BLOCK_M  # [BE]
    block_end = tl.cumsum(blocks, axis=0)
    block_start = block_end - blocks
    used_blocks = tl.sum(blocks, axis=0)
    for b0 in range(0, num_blocks, BLOCK_B):
        blk = b0 + tl.arange(0, BLOCK_B)
        owner = tl.sum((block_end[None, :] <= blk[:, None]).to(tl.int32), axis=1)  # [BB]
        owner = tl.where(blk < used_blocks, owner, -1)
        tl.store(expert_ids_ptr + blk, owner, mask=blk < num_blocks)
    # 3. each pair's slot: its expert's first slot + its rank among that expert's pairs
    seen = tl.zeros((BLOCK_E,), dtype=tl.int32)
    for p0 in range(0, num_pairs, BLOCK_P):
        pair = p0 + offs_p
        ids = tl.load(topk_ids_ptr + pair, mask=pair < num_pairs, other=-1).to(tl.int32)
        hot = (ids[:, None] == experts[None, :]).to(tl.int32)  # [BP, BE]
        before = tl.cumsum(hot, axis=0) - hot + seen[None, :]  # earlier pairs, same expert
        slot = tl.sum(hot * (block_start[None, :] * BLOCK_M + before), axis=1)  # [BP]
        tl.store(sorted_ptr + slot, pair, mask=pair < num_pairs)
        seen += tl.sum(hot, axis=0)
    # 4. padding: the slots no pair took (the tail of each expert's last block, unused blocks)
    for s0 in range(0, num_blocks * BLOCK_M, BLOCK_B * BLOCK_M):
        s = s0 + tl.arange(0, BLOCK_B * BLOCK_M)
        blk = s // BLOCK_M
        own = (block_start[None, :] <= blk[:, None]) & (blk[:, None] < block_end[None, :])
        first = tl.sum(tl.where(own, block_start[None, :] * BLOCK_M, 0), axis=1)
        count = tl.sum(tl.where(own, counts[None, :], 0), axis=1)  # 0 past the used blocks
        pad = (s - first >= count) & (s < num_blocks * BLOCK_M)
        tl.store(sorted_ptr + s, num_pairs + tl.zeros_like(s), mask=pad)


def align_block_size(
    topk_ids: torch.Tensor,  # [T, k]
    num_experts: int,
    block_m: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch_ref.align_block_size`` (same outputs, bit for bit) in one launch."""
    num_pairs = topk_ids.numel()
    if num_pairs > _MAX_TRITON_ALIGN_PAIRS:
        return align_block_size_torch(topk_ids, num_experts, block_m)
    dev = topk_ids.device
    n_blocks = max_num_blocks(num_pairs, num_experts, block_m)
    sorted_token_ids = torch.empty((n_blocks * block_m,), dtype=torch.int32, device=dev)
    expert_ids = torch.empty((n_blocks,), dtype=torch.int32, device=dev)
    if num_pairs == 0:
        return sorted_token_ids, expert_ids
    block_e = triton.next_power_of_2(num_experts)
    block_p = max(16, min(triton.next_power_of_2(num_pairs), _ALIGN_TILE // block_e))
    block_b = max(1, min(triton.next_power_of_2(n_blocks), _ALIGN_TILE // (block_e * block_m)))
    _align_kernel[(1,)](
        topk_ids.contiguous(),
        sorted_token_ids,
        expert_ids,
        num_pairs,
        num_experts,
        n_blocks,
        BLOCK_M=block_m,
        BLOCK_P=block_p,
        BLOCK_E=block_e,
        BLOCK_B=block_b,
        num_warps=8 if block_e * block_p >= 8192 else 4,
    )
    return sorted_token_ids, expert_ids
