"""Triton fused MoE: grouped gate/up GEMM with SiLU·up, grouped down GEMM, top-k combine.

Weights use the fused layout of ``torch_ref`` (``w13 [E, 2I, H]``, gate rows above up rows;
``w2 [E, H, I]``), in the activation dtype or as fp8 with per-channel scales (``fp8.py``).
Kernels:

* ``_gate_up_kernel``: one program per (block of pairs, ``BLOCK_N`` columns of I). It streams
  the expert's gate and up rows for those columns, accumulates ``x @ gate^T`` and ``x @ up^T``
  in float32 and stores ``silu(gate) * up`` (times the fp8 channel scales first) as the
  intermediate activation of each pair, ``act [T*k, I]`` in the activation dtype.
* ``_down_kernel``: one program per (block of pairs, ``BLOCK_N`` columns of H): ``act @ w2^T``
  times the pair's routing weight, stored per pair as ``y [T*k, H]``.
* ``_combine_kernel``: ``out[t] = sum_j y[t*k + j]`` in float32.
* ``_down_combine_kernel`` (small batches): one program per (token, columns of H) runs the down
  GEMM of each of the token's k experts in turn, in one flattened loop over (expert, K step)
  so the loads stay pipelined across experts, and sums them in registers: no ``y``, no combine.

A few tokens with their router (``triton_moe_token.max_tokens()``) go through
``triton_moe_token.py`` instead (three launches).

Two schedules, chosen per batch by ``tile_config``. Grouped (``pair_major=False``): the pairs
are sorted by expert into blocks of ``BLOCK_M`` rows (``triton_routing.align_block_size``);
each block's weight tile is read once for up to ``BLOCK_M`` pairs. Pair-major (a few tokens):
each gate/up program serves one pair (no alignment launch) and the down GEMM sums the top k per
token; an expert shared by two pairs is read twice (from L2 when the programs run together),
so the table picks it for one token (whose k experts are distinct) or for at most 16 pairs over
at least eight times as many experts.

At decode sizes this is weight streaming: every hit expert's ``3·H·I`` weights are read once,
and the tiles are chosen to keep enough loads in flight on every SM (``tile_config``). All grid
sizes come from host integers (upper bounds for the grouped schedule; programs of unused blocks
return at once), so nothing here waits on the device and the op is CUDA-graph capturable.
Results are deterministic: no atomics, every sum in a fixed order.

fp8 is weight-only: the e4m3 tile converts exactly to the activation dtype in the inner loop,
the dot runs in that dtype with float32 accumulation, and the per-channel scale multiplies the
float32 accumulator (it factors out of the K sum). Activations are not quantized.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from outrider.kernels.moe import triton_moe_token
from outrider.kernels.moe.fp8 import FP8_DTYPE
from outrider.kernels.moe.torch_ref import TorchMoeBackend
from outrider.kernels.moe.triton_routing import align_block_size, select_experts

_COMBINE_BLOCK_H = 512


@dataclass(frozen=True)
class MoeTileConfig:
    block_m: int  # rows (pairs) of one tile; the pair-major schedule uses row 0 only
    block_n1: int  # gate/up: columns of I per program (each for gate and for up)
    block_k1: int  # gate/up: K step over H
    block_n2: int  # down: columns of H per program
    block_k2: int  # down: K step over I
    num_warps: int
    stages1: int  # software-pipeline depth of the gate/up GEMM
    stages2: int  # and of the down GEMM
    pair_major: bool  # one program per pair, down GEMM sums each token's top k


# NOTE: sm_90 choices from benchmarks/gpu_moe.py --sweep on an H200 (Qwen3-30B-A3B layer,
# CUDA-graph replays): at one token the grouped schedule beat the pair-major one (bf16 35.1 us
# against 37.9; fp8 weights 34-35 against 61-64); at 8 tokens (64 pairs over 128 experts) the
# pair-major one with these tiles did (bf16 136.9 us against 152.6 grouped), while fp8 weights
# stayed fastest grouped (120.8 us against 125.3). At decode sizes the kernels stream weights:
# tiles are narrow in N so every SM runs several programs, and long in K with enough stages
# to keep tens of KB of loads in flight per SM. Prefill-size batches get tensor-core tiles. K
# steps shrink to divide H and I.
_PAIR_MAJOR_MAX_PAIRS = 64
_PAIR_MAJOR = MoeTileConfig(16, 32, 128, 32, 256, 4, 4, 6, True)
# Grouped schedule by pairs per expert (T*k/E); fp8 doubles the K steps up to block_m 32.
_GROUPED = (
    (16, MoeTileConfig(16, 32, 128, 64, 128, 4, 4, 4, False)),
    (48, MoeTileConfig(32, 64, 128, 64, 128, 4, 3, 3, False)),
    (128, MoeTileConfig(64, 64, 64, 64, 64, 4, 4, 4, False)),
    (float("inf"), MoeTileConfig(128, 64, 64, 128, 64, 8, 3, 3, False)),
)
# NOTE: float32 (exact "ieee" dots on FMA units; the test and interpreter path) keeps tiles small.
_FLOAT32 = MoeTileConfig(16, 32, 32, 32, 32, 4, 2, 2, False)


def _fit_k(block_k: int, k: int) -> int:
    """The largest power-of-two step <= block_k (and >= 32) that divides k, else block_k:
    unmasked K loads stay 16-byte vectors."""
    step = block_k
    while step > 32 and k % step:
        step //= 2
    return step if k % step == 0 else block_k


def tile_config(
    num_tokens: int,
    top_k: int,
    num_experts: int,
    hidden: int,
    inter: int,
    dtype: torch.dtype,
    fp8: bool,
) -> MoeTileConfig:
    """The tiles and schedule for a batch of ``num_tokens`` (host integers only)."""
    num_pairs = num_tokens * top_k
    # NOTE: pair-major pays when tokens rarely share an expert (pairs <= E / 2), from 2 tokens.
    pair_major = (
        not fp8
        and num_tokens > 1
        and num_pairs <= _PAIR_MAJOR_MAX_PAIRS
        and 2 * num_pairs <= num_experts
    )
    if dtype == torch.float32:
        return replace(_FLOAT32, pair_major=pair_major)
    if pair_major:
        cfg = _PAIR_MAJOR
    else:
        per_expert = num_pairs / num_experts
        cfg = next(c for bound, c in _GROUPED if per_expert <= bound)
        if fp8 and cfg.block_m <= 32:
            cfg = replace(cfg, block_k1=2 * cfg.block_k1, block_k2=2 * cfg.block_k2)
    return replace(cfg, block_k1=_fit_k(cfg.block_k1, hidden), block_k2=_fit_k(cfg.block_k2, inter))


@triton.jit
def _gate_up_kernel(
    x_ptr,
    w_ptr,
    scale_ptr,
    act_ptr,
    sorted_ptr,
    expert_ptr,
    num_pairs,
    inter,
    hidden,
    stride_xt,
    stride_we,
    stride_wn,
    stride_se,
    stride_at,
    TOP_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PAIR_MAJOR: tl.constexpr,
    FP8: tl.constexpr,
    EVEN_K: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    if PAIR_MAJOR:
        # expert_ptr is topk_ids [T*k]: program pid_m serves pair pid_m alone (row 0)
        expert = tl.load(expert_ptr + pid_m).to(tl.int64)
        pairs = pid_m + offs_m * 0
        row_ok = offs_m == 0
    else:
        expert = tl.load(expert_ptr + pid_m).to(tl.int64)
        if expert < 0:
            return
        pairs = tl.load(sorted_ptr + pid_m * BLOCK_M + offs_m)  # [BM]
        row_ok = pairs < num_pairs
    tok = (pairs // TOP_K).to(tl.int64)  # [BM]
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < inter
    offs_k = tl.arange(0, BLOCK_K)
    # NOTE: pair-major reads its one row as a vector and broadcasts it into the tile, so the
    # pipeline buffers hold weights only.
    x_ptrs = x_ptr + tok[:, None] * stride_xt + offs_k[None, :]  # [BM, BK]
    x_row = x_ptr + (pid_m // TOP_K).to(tl.int64) * stride_xt + offs_k  # [BK]
    g_ptrs = w_ptr + expert * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None]  # [BK, BN]
    u_ptrs = g_ptrs + inter * stride_wn
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        k_ok = offs_k < hidden - k0
        if EVEN_K:
            g = tl.load(g_ptrs, mask=n_ok[None, :], other=0.0)
            u = tl.load(u_ptrs, mask=n_ok[None, :], other=0.0)
        else:
            g = tl.load(g_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            u = tl.load(u_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if PAIR_MAJOR:
            if EVEN_K:
                a_row = tl.load(x_row)  # [BK]
            else:
                a_row = tl.load(x_row, mask=k_ok, other=0.0)
            a = tl.where(row_ok[:, None], a_row[None, :], 0.0).to(a_row.dtype)
        elif EVEN_K:
            a = tl.load(x_ptrs, mask=row_ok[:, None], other=0.0)
        else:
            a = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        if FP8:
            g = g.to(a.dtype)
            u = u.to(a.dtype)
        acc_g = tl.dot(a, g, acc_g, input_precision=DOT_PREC)
        acc_u = tl.dot(a, u, acc_u, input_precision=DOT_PREC)
        x_ptrs += BLOCK_K
        x_row += BLOCK_K
        g_ptrs += BLOCK_K
        u_ptrs += BLOCK_K
    if FP8:
        s_ptrs = scale_ptr + expert * stride_se + offs_n
        acc_g *= tl.load(s_ptrs, mask=n_ok, other=0.0)[None, :]
        acc_u *= tl.load(s_ptrs + inter, mask=n_ok, other=0.0)[None, :]
    act = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u  # silu(gate) * up
    out_ptrs = act_ptr + pairs[:, None].to(tl.int64) * stride_at + offs_n[None, :]
    tl.store(out_ptrs, act.to(act_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def _down_kernel(
    act_ptr,
    w_ptr,
    scale_ptr,
    topk_w_ptr,
    y_ptr,
    sorted_ptr,
    expert_ptr,
    num_pairs,
    hidden,
    inter,
    stride_at,
    stride_we,
    stride_wn,
    stride_se,
    stride_yt,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    FP8: tl.constexpr,
    EVEN_K: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(expert_ptr + pid_m).to(tl.int64)
    if expert < 0:
        return
    pairs = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))  # [BM]
    row_ok = pairs < num_pairs
    rows = pairs.to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < hidden
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = act_ptr + rows[:, None] * stride_at + offs_k[None, :]  # [BM, BK]
    w_ptrs = w_ptr + expert * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None]  # [BK, BN]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, inter, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
            w = tl.load(w_ptrs, mask=n_ok[None, :], other=0.0)
        else:
            k_ok = offs_k < inter - k0
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if FP8:
            w = w.to(a.dtype)
        acc = tl.dot(a, w, acc, input_precision=DOT_PREC)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if FP8:
        acc *= tl.load(scale_ptr + expert * stride_se + offs_n, mask=n_ok, other=0.0)[None, :]
    acc *= tl.load(topk_w_ptr + rows, mask=row_ok, other=0.0)[:, None]
    out_ptrs = y_ptr + rows[:, None] * stride_yt + offs_n[None, :]
    tl.store(out_ptrs, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def _combine_kernel(
    y_ptr,
    out_ptr,
    hidden,
    stride_yt,
    stride_ot,
    TOP_K: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    ok = offs < hidden
    acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        acc += tl.load(y_ptr + (t * TOP_K + j) * stride_yt + offs, mask=ok, other=0.0).to(
            tl.float32
        )
    tl.store(out_ptr + t * stride_ot + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _down_combine_kernel(
    act_ptr,
    w_ptr,
    scale_ptr,
    topk_w_ptr,
    topk_ids_ptr,
    out_ptr,
    hidden,
    inter,
    stride_at,
    stride_we,
    stride_wn,
    stride_se,
    stride_ot,
    TOP_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    FP8: tl.constexpr,
    EVEN_K: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    row_ok = offs_m == 0  # the tile's row 0 is the pair; the others stay zero
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < hidden
    offs_k = tl.arange(0, BLOCK_K)
    num_k = tl.cdiv(inter, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # the current expert's partial sums
    total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # weighted sum over finished experts
    for it in range(0, TOP_K * num_k):
        j = it // num_k
        k0 = (it - j * num_k) * BLOCK_K
        pair = t * TOP_K + j
        expert = tl.load(topk_ids_ptr + pair).to(tl.int64)
        w_ptrs = w_ptr + expert * stride_we + offs_n[None, :] * stride_wn + (k0 + offs_k)[:, None]
        k_ok = offs_k < inter - k0
        if EVEN_K:
            w = tl.load(w_ptrs, mask=n_ok[None, :], other=0.0)
        else:
            w = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        # NOTE: the pair's activation row as a vector, broadcast into row 0 of the tile.
        a_ptrs = act_ptr + pair * stride_at + k0 + offs_k  # [BK]
        if EVEN_K:
            a_row = tl.load(a_ptrs)
        else:
            a_row = tl.load(a_ptrs, mask=k_ok, other=0.0)
        a = tl.where(row_ok[:, None], a_row[None, :], 0.0).to(a_row.dtype)  # [BM, BK]
        if FP8:
            w = w.to(a.dtype)
        acc = tl.dot(a, w, acc, input_precision=DOT_PREC)
        # NOTE: at an expert's last K step its sum is scaled into the total and restarted.
        last = k0 + BLOCK_K >= inter
        weight = tl.load(topk_w_ptr + pair)
        if FP8:
            scale = weight * tl.load(scale_ptr + expert * stride_se + offs_n, mask=n_ok, other=0.0)
            total = tl.where(last, total + acc * scale[None, :], total)
        else:
            total = tl.where(last, total + acc * weight, total)
        acc = tl.where(last, 0.0, acc)
    out = tl.sum(total, axis=0)  # [BN]: rows other than 0 are zero
    tl.store(out_ptr + t * stride_ot + offs_n, out.to(out_ptr.dtype.element_ty), mask=n_ok)


def _check(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_ids: torch.Tensor,
    w13_scale: torch.Tensor | None,
    w2_scale: torch.Tensor | None,
) -> None:
    num_experts, two_inter, hidden = w13.shape
    inter = two_inter // 2
    if x.shape[1] != hidden or two_inter % 2 or tuple(w2.shape) != (num_experts, hidden, inter):
        raise ValueError(
            f"MoE shapes disagree: x {tuple(x.shape)}, w13 {tuple(w13.shape)} (want [E, 2I, H]), "
            f"w2 {tuple(w2.shape)} (want [E, H, I])"
        )
    if (w13_scale is None) != (w2_scale is None):
        raise ValueError("fp8 MoE weights need both `w13_scale` and `w2_scale`")
    fp8 = w13_scale is not None
    for name, w in (("w13", w13), ("w2", w2)):
        want = FP8_DTYPE if fp8 else x.dtype
        if w.dtype != want:
            raise ValueError(f"`{name}` must be {want} here, got {w.dtype}")
        if w.stride(-1) != 1:
            raise ValueError(f"`{name}` needs a contiguous last dimension")
    if fp8:
        assert w13_scale is not None and w2_scale is not None
        if tuple(w13_scale.shape) != (num_experts, two_inter) or tuple(w2_scale.shape) != (
            num_experts,
            hidden,
        ):
            raise ValueError(
                f"fp8 scales must be w13_scale [E, 2I] and w2_scale [E, H], got "
                f"{tuple(w13_scale.shape)} and {tuple(w2_scale.shape)}"
            )
        if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise ValueError(f"fp8 weights need bf16/fp16/fp32 activations, got {x.dtype}")
        if x.is_cuda and torch.cuda.get_device_capability(x.device) < (8, 9):
            raise ValueError("fp8 (e4m3) weights need compute capability 8.9 or newer")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != x.shape[0]:
        raise ValueError(f"`topk_ids` must be [T, k] with T = {x.shape[0]}")


def fused_moe(
    x: torch.Tensor,  # [T, H]
    w13: torch.Tensor,  # [E, 2I, H]
    w2: torch.Tensor,  # [E, H, I]
    topk_weights: torch.Tensor,  # [T, k] float32
    topk_ids: torch.Tensor,  # [T, k] int64 or int32
    w13_scale: torch.Tensor | None = None,  # [E, 2I] float32 with fp8 weights
    w2_scale: torch.Tensor | None = None,  # [E, H] float32 with fp8 weights
    *,
    config: MoeTileConfig | None = None,  # None: tile_config's choice
    out: torch.Tensor | None = None,  # [T, H] in x.dtype, written in full
) -> torch.Tensor:
    """``torch_ref.moe_reference`` as Triton kernels; returns ``[T, H]`` in ``x.dtype``."""
    _check(x, w13, w2, topk_ids, w13_scale, w2_scale)
    num_tokens, hidden = x.shape
    num_experts, two_inter, _ = w13.shape
    inter = two_inter // 2
    top_k = topk_ids.shape[1]
    dev = x.device
    if out is None:
        out = torch.empty((num_tokens, hidden), dtype=x.dtype, device=dev)  # [T, H]
    elif out.shape != x.shape or out.dtype != x.dtype or out.stride(-1) != 1:
        raise ValueError("`out` must be [T, H] in x.dtype with a contiguous last dimension")
    if num_tokens == 0:
        return out
    fp8 = w13_scale is not None
    cfg = config or tile_config(num_tokens, top_k, num_experts, hidden, inter, x.dtype, fp8)
    if x.stride(-1) != 1:
        x = x.contiguous()
    ids = topk_ids.contiguous()  # [T, k]
    weights = topk_weights.to(torch.float32).contiguous()  # [T, k]
    s13 = w13_scale.to(torch.float32).contiguous() if w13_scale is not None else weights
    s2 = w2_scale.to(torch.float32).contiguous() if w2_scale is not None else weights
    num_pairs = num_tokens * top_k
    act = torch.empty((num_pairs, inter), dtype=x.dtype, device=dev)  # [T*k, I]
    common = dict(
        FP8=fp8, DOT_PREC="ieee" if x.dtype == torch.float32 else "tf32", num_warps=cfg.num_warps
    )
    if cfg.pair_major:
        sorted_ids, block_experts, n_blocks = ids, ids, num_pairs
    else:
        sorted_ids, block_experts = align_block_size(ids, num_experts, cfg.block_m)
        n_blocks = block_experts.numel()
    _gate_up_kernel[(n_blocks, triton.cdiv(inter, cfg.block_n1))](
        x,
        w13,
        s13,
        act,
        sorted_ids,
        block_experts,
        num_pairs,
        inter,
        hidden,
        x.stride(0),
        w13.stride(0),
        w13.stride(1),
        s13.stride(0),
        act.stride(0),
        TOP_K=top_k,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n1,
        BLOCK_K=cfg.block_k1,
        PAIR_MAJOR=cfg.pair_major,
        EVEN_K=hidden % cfg.block_k1 == 0,
        num_stages=cfg.stages1,
        **common,
    )
    if cfg.pair_major:
        _down_combine_kernel[(num_tokens, triton.cdiv(hidden, cfg.block_n2))](
            act,
            w2,
            s2,
            weights,
            ids,
            out,
            hidden,
            inter,
            act.stride(0),
            w2.stride(0),
            w2.stride(1),
            s2.stride(0),
            out.stride(0),
            TOP_K=top_k,
            BLOCK_M=cfg.block_m,
            BLOCK_N=cfg.block_n2,
            BLOCK_K=cfg.block_k2,
            EVEN_K=inter % cfg.block_k2 == 0,
            num_stages=cfg.stages2,
            **common,
        )
        return out
    y = torch.empty((num_pairs, hidden), dtype=x.dtype, device=dev)  # [T*k, H] weighted
    _down_kernel[(n_blocks, triton.cdiv(hidden, cfg.block_n2))](
        act,
        w2,
        s2,
        weights,
        y,
        sorted_ids,
        block_experts,
        num_pairs,
        hidden,
        inter,
        act.stride(0),
        w2.stride(0),
        w2.stride(1),
        s2.stride(0),
        y.stride(0),
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n2,
        BLOCK_K=cfg.block_k2,
        EVEN_K=inter % cfg.block_k2 == 0,
        num_stages=cfg.stages2,
        **common,
    )
    _combine_kernel[(num_tokens, triton.cdiv(hidden, _COMBINE_BLOCK_H))](
        y,
        out,
        hidden,
        y.stride(0),
        out.stride(0),
        TOP_K=top_k,
        BLOCK_H=_COMBINE_BLOCK_H,
        num_warps=4,
    )
    return out


class TritonMoeBackend(TorchMoeBackend):
    """The ``triton`` MoE backend: Triton routing and fused MoE (bf16/fp16/fp32, fp8 weights)."""

    name = "triton"
    # NOTE: no host syncs and grids sized from host integers; see the module docstring.
    cuda_graph_safe = True
    select_experts = staticmethod(select_experts)
    fused_moe = staticmethod(fused_moe)
    # NOTE: a few tokens, router included, in three launches (triton_moe_token.py).
    token_moe_applies = staticmethod(triton_moe_token.applies)
    token_moe = staticmethod(triton_moe_token.token_moe)


BACKEND = TritonMoeBackend()
