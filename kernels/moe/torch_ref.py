"""Reference MoE in torch: expert routing, a per-expert loop oracle and a grouped CPU path.

Expert weights follow vLLM's fused layout: ``w13 [E, 2I, H]`` holds each expert's gate rows
(first I) above its up rows (last I), and ``w2 [E, H, I]`` is the down projection. The expert
MLP is ``w2 @ (silu(gate @ x) * (up @ x))``; a token's output is the routing-weighted sum over
its top-k experts. fp8 weights (``kernels/moe/fp8.py``) come with ``w13_scale [E, 2I]`` and
``w2_scale [E, H]``; the loop reference (``torch_loop``) dequantizes each expert it visits, the
grouped ``torch`` backend takes unquantized weights only.

``align_block_size`` is the reference of the grouping that the Triton kernels read: token-expert
pairs sorted by expert into blocks of ``block_m`` rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from outrider.kernels.moe.fp8 import dequantize_fp8

# NOTE: torch's grouped_mm runs on the CPU for these dtypes only (not float64).
_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _accum_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def select_experts(
    router_logits: torch.Tensor,  # [T, E]
    top_k: int,
    renormalize: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over all experts, keep the top k, optionally renormalise them to sum to 1.

    Covers Qwen3-MoE (``renormalize = norm_topk_prob``) and Mixtral (softmax over the top-k
    logits, which equals softmax → top-k → renormalise). Returns ``topk_weights [T, k]`` float32
    (for every logits dtype, as HF does) and ``topk_ids [T, k]`` int64.
    """
    probs = torch.softmax(router_logits.to(torch.float32), dim=-1)  # [T, E]
    topk_weights, topk_ids = torch.topk(probs, top_k, dim=-1)  # [T, k]
    if renormalize:
        topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
    return topk_weights, topk_ids


def _expert_mlp(
    x: torch.Tensor,  # [M, H]
    w13: torch.Tensor,  # [2I, H]
    w2: torch.Tensor,  # [H, I]
) -> torch.Tensor:
    gate_up = F.linear(x, w13)  # [M, 2I]
    inter = w2.shape[1]
    return F.linear(F.silu(gate_up[:, :inter]) * gate_up[:, inter:], w2)  # [M, H]


def _expert_weight(
    w: torch.Tensor,  # [E, N, K]
    scale: torch.Tensor | None,  # [E, N] for fp8 weights
    e: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    return w[e] if scale is None else dequantize_fp8(w[e], scale[e], dtype)  # [N, K]


def moe_reference(
    x: torch.Tensor,  # [T, H]
    w13: torch.Tensor,  # [E, 2I, H]
    w2: torch.Tensor,  # [E, H, I]
    topk_weights: torch.Tensor,  # [T, k]
    topk_ids: torch.Tensor,  # [T, k]
    w13_scale: torch.Tensor | None = None,  # [E, 2I] with fp8 w13
    w2_scale: torch.Tensor | None = None,  # [E, H] with fp8 w2
) -> torch.Tensor:
    """Plain per-expert loop: the oracle every MoE kernel is checked against.

    fp8 weights are dequantized to ``x.dtype`` one expert at a time (exactly, for float64 x).
    """
    if (w13_scale is None) != (w2_scale is None):
        raise ValueError("fp8 MoE weights need both `w13_scale` and `w2_scale`")
    acc = _accum_dtype(x.dtype)
    out = torch.zeros(x.shape, dtype=acc, device=x.device)  # [T, H]
    for e in range(w13.shape[0]):
        tok, slot = torch.where(topk_ids == e)
        if tok.numel() == 0:
            continue
        w13_e = _expert_weight(w13, w13_scale, e, x.dtype)  # [2I, H]
        w2_e = _expert_weight(w2, w2_scale, e, x.dtype)  # [H, I]
        y = _expert_mlp(x[tok], w13_e, w2_e)  # [m, H]
        out.index_add_(0, tok, y.to(acc) * topk_weights[tok, slot, None].to(acc))
    return out.to(x.dtype)


def max_num_blocks(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Upper bound on the blocks of ``block_m`` rows that ``num_pairs`` pairs fill when grouped
    by expert: each of at most ``min(E, pairs)`` experts wastes at most ``block_m - 1`` rows."""
    return (num_pairs + min(num_experts, num_pairs) * (block_m - 1)) // block_m


def align_block_size(
    topk_ids: torch.Tensor,  # [T, k]
    num_experts: int,
    block_m: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Group the ``T * k`` token-expert pairs by expert into blocks of ``block_m`` rows.

    Returns ``sorted_token_ids [max_num_blocks * block_m]`` int32: pair indices ``t * k + j``,
    each expert's pairs in increasing order, its last block padded with ``T * k``; and
    ``expert_ids [max_num_blocks]`` int32: the expert of each block, -1 past the used blocks
    (whose rows are ``T * k`` too). Sizes come from host integers only, so nothing waits on
    the device.
    """
    num_pairs = topk_ids.numel()
    dev = topk_ids.device
    n_blocks = max_num_blocks(num_pairs, num_experts, block_m)
    flat = topk_ids.reshape(-1).to(torch.int64)  # [P]
    counts = torch.zeros(num_experts, dtype=torch.int64, device=dev)
    counts.index_add_(0, flat, torch.ones_like(flat))  # [E]
    blocks = (counts + block_m - 1) // block_m  # [E]
    block_end = torch.cumsum(blocks, 0)  # [E]
    block_start = block_end - blocks  # [E]
    order = torch.argsort(flat, stable=True)  # [P]
    expert_of = flat[order]  # [P]
    first = torch.cumsum(counts, 0) - counts  # [E] first sorted position of each expert
    rank = torch.arange(num_pairs, device=dev) - first[expert_of]  # [P]
    dest = block_start[expert_of] * block_m + rank  # [P]
    sorted_token_ids = torch.full((n_blocks * block_m,), num_pairs, dtype=torch.int32, device=dev)
    sorted_token_ids[dest] = order.to(torch.int32)
    block = torch.arange(n_blocks, device=dev)  # [B]
    expert_ids = torch.searchsorted(block_end, block, right=True)  # [B]
    expert_ids = torch.where(block < block_end[-1], expert_ids, -1).to(torch.int32)
    return sorted_token_ids, expert_ids


class TorchMoeBackend:
    """Grouped MoE: token-expert pairs sorted by expert, one matmul per expert segment.

    On the CPU in float32/bf16/fp16 both projections are single ``grouped_mm`` calls over the
    sorted pairs; elsewhere (float64, CUDA) the segments are walked with one matmul each.
    """

    name = "torch"

    @staticmethod
    def select_experts(
        router_logits: torch.Tensor, top_k: int, renormalize: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return select_experts(router_logits, top_k, renormalize)

    @staticmethod
    def fused_moe(
        x: torch.Tensor,  # [T, H]
        w13: torch.Tensor,  # [E, 2I, H]
        w2: torch.Tensor,  # [E, H, I]
        topk_weights: torch.Tensor,  # [T, k] float32 (or wider)
        topk_ids: torch.Tensor,  # [T, k] int64
        w13_scale: torch.Tensor | None = None,
        w2_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if w13_scale is not None or w2_scale is not None:
            raise ValueError(
                "the `torch` MoE backend takes unquantized weights only; fp8 runs on "
                "`torch_loop` or `triton`"
            )
        num_tokens, top_k = topk_ids.shape
        num_experts, inter = w13.shape[0], w2.shape[2]
        acc = _accum_dtype(x.dtype)
        if num_tokens == 0:
            return x.new_zeros(x.shape)
        flat_ids = topk_ids.reshape(-1)  # [T*k]
        order = torch.argsort(flat_ids, stable=True)  # [T*k] pairs grouped by expert
        token_of_pair = order // top_k  # [T*k]
        counts = torch.bincount(flat_ids, minlength=num_experts)  # [E]
        xs = x[token_of_pair]  # [T*k, H]
        if x.device.type == "cpu" and x.dtype in _GROUPED_MM_DTYPES:
            offsets = torch.cumsum(counts, 0).to(torch.int32)  # [E] segment ends
            gate_up = F.grouped_mm(xs, w13.transpose(1, 2), offs=offsets)  # [T*k, 2I]
            act = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]  # [T*k, I]
            ys = F.grouped_mm(act, w2.transpose(1, 2), offs=offsets)  # [T*k, H]
        else:
            ys = torch.empty_like(xs)  # [T*k, H]
            start = 0
            for e, n in enumerate(counts.tolist()):
                if n:
                    ys[start : start + n] = _expert_mlp(xs[start : start + n], w13[e], w2[e])
                    start += n
        weights = topk_weights.reshape(-1)[order, None].to(acc)  # [T*k, 1]
        out = torch.zeros(x.shape, dtype=acc, device=x.device)  # [T, H]
        out.index_add_(0, token_of_pair, ys.to(acc) * weights)
        return out.to(x.dtype)


BACKEND = TorchMoeBackend()


class TorchLoopMoeBackend(TorchMoeBackend):
    """The per-expert reference loop as a selectable backend (for checking and debugging)."""

    name = "torch_loop"

    @staticmethod
    def fused_moe(
        x: torch.Tensor,
        w13: torch.Tensor,
        w2: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        w13_scale: torch.Tensor | None = None,
        w2_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return moe_reference(x, w13, w2, topk_weights, topk_ids, w13_scale, w2_scale)


LOOP_BACKEND = TorchLoopMoeBackend()
