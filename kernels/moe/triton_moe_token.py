"""A few tokens' routed MoE block in three launches: split-K router, gate/up with its own top-k,
down GEMVs summed over the experts.

A decode step of one sequence sends one token through every MoE block, and its verify k + 1.
One token's work is k GEMVs over k distinct experts (Qwen3-30B-A3B: 8 of 128 experts, 75 MB of
weights, and a 0.5 MB router); the general path (``triton_moe.py``) spends six launches on it
(router GEMM, top-k, block alignment, gate/up, down, combine), and at one token every launch's
ramp and tail cost more than its work. Here, for ``T <= max_tokens()`` tokens (each token's
pairs are its own, as in the general path's pair-major schedule: an expert two tokens share is
streamed twice, mostly from L2):

* ``_router_kernel``: one program per (``BLOCK_E`` experts, ``BLOCK_K`` columns of H) writes
  each token's partial logits in float32, ``parts [T, S, E]`` with ``S = cdiv(H, BLOCK_K)``:
  128 small programs instead of a GEMV over 16. Its weight tile is loaded before the PDL wait
  (weights never depend on the previous kernel) and serves every token.
* ``_gate_up_kernel``: one program per (token's pair ``j``, ``BLOCK_N`` columns of I) sums the S
  partial logits and rounds them to the activation dtype (as the router's linear layer returns
  them). A program needs only its own expert, the j-th largest logit, found with one max per
  rank over packed (value, index) keys: ``select_experts``' choice, since the softmax keeps the
  order and the smallest index wins among equals. One extra program runs the softmax and top-k
  itself (``triton_routing.softmax_topk``) and writes ``topk_weights`` and ``topk_ids``. Then
  the expert's gate and up GEMVs over H: ``act[j] = silu(gate) * up``, in the activation dtype.
* ``_down_kernel``: one program per (token, ``BLOCK_N`` columns of H) runs the token's k down
  GEMVs together: its tile has one row per (pair, column), so every pair's weights stream in
  the same load, and the next K tile's load is issued before the current one's products. (One
  expert at a time, the loop's expert-id loads and small tiles kept too few bytes in flight:
  15.6 us for the 25 MB of down weights on an H200, 9.0 us now.) Each activation is scaled by
  its routing weight as it is loaded, so the sum over the tile's rows is the output row,
  without a combine.

One row needs no tensor cores: products accumulate in ``[BLOCK_N, BLOCK_K]`` float32 tiles, as
the skinny GEMM's one-row path does. Results are deterministic (fixed reduction trees, no
atomics); grids come from host integers, so the three launches capture in a CUDA graph. The
kernels use PDL like the other decode kernels (``kernels/fused/pdl.py``). fp8 weights, more
than ``max_tokens()`` tokens, and tensors that autograd tracks take the general path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from outrider.kernels.fused.dispatch import pdl, use_fused
from outrider.kernels.fused.pdl import pdl_prologue
from outrider.kernels.moe.triton_routing import softmax_topk

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_MAX_EXPERTS = 1024
_MAX_SPLITS = 64
MAX_TOKENS = 16
# NOTE: H200, Qwen3-30B-A3B block (bench-kernels --parts moe, two alternations): 46.5 us
# against 58.7-59.1 for the general path at 2 tokens, 66.5 against 83.7-84.4 at 3, 100.5-100.6
# against 105.7-106.1 at 5; 148.1-148.7 against 141.3-141.5 at 8.
DEFAULT_MAX_TOKENS = 5


@dataclass(frozen=True)
class TokenMoeConfig:
    router_block_e: int  # experts per router program
    router_block_k: int  # columns of H per router program (one tile)
    block_n1: int  # gate/up: columns of I per program (each for gate and for up)
    block_k1: int  # gate/up: K step over H
    block_n2: int  # down: columns of H per program (its tile has k * block_n2 rows)
    block_k2: int  # down: K step over I
    num_warps: int
    stages1: int  # gate/up's num_stages (the down loop double-buffers by hand)


# NOTE: sm_90 choice from benchmarks/gpu_moe_token.py --sweep on an H200 (Qwen3-30B-A3B block,
# CUDA-graph replays): narrow N tiles so that every SM holds several streaming programs; the
# down tile is 8 pairs x 4 columns x 128 (96 registers, the 512 programs in one wave).
DEFAULT_CONFIG = TokenMoeConfig(8, 256, 16, 256, 4, 128, 4, 5)
# NOTE: float32 (tests, the interpreter) keeps tiles small.
_FLOAT32 = TokenMoeConfig(8, 64, 8, 64, 8, 64, 4, 2)


def enabled() -> bool:
    """``OUTRIDER_MOE_TOKEN_PATH=0`` sends every batch through the general path."""
    return os.environ.get("OUTRIDER_MOE_TOKEN_PATH", "1") != "0"


def max_tokens() -> int:
    """The most tokens ``token_moe`` takes in one call (``OUTRIDER_MOE_TOKEN_MAX``, at most
    ``MAX_TOKENS``; 0 sends every batch through the general path)."""
    raw = os.environ.get("OUTRIDER_MOE_TOKEN_MAX", str(DEFAULT_MAX_TOKENS))
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"`OUTRIDER_MOE_TOKEN_MAX` must be an integer, got {raw!r}") from None
    if not 0 <= value <= MAX_TOKENS:
        raise ValueError(f"`OUTRIDER_MOE_TOKEN_MAX` must be in [0, {MAX_TOKENS}], got {value}")
    return value


def applies(x: torch.Tensor, gate_weight: torch.Tensor, w13: torch.Tensor) -> bool:
    """True when ``token_moe`` runs this call (host-side checks only)."""
    return (
        enabled()
        and x.dim() == 2
        and 1 <= x.shape[0] <= max_tokens()
        and use_fused(x)
        and x.dtype in _DTYPES
        and gate_weight.dtype == x.dtype
        and w13.dtype == x.dtype
        and not gate_weight.requires_grad
        and gate_weight.shape[0] <= _MAX_EXPERTS
        and gate_weight.device == x.device
    )


@triton.jit
def _router_kernel(
    x_ptr,
    w_ptr,
    parts_ptr,
    num_tokens,
    num_experts,
    hidden,
    stride_xt,
    stride_we,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pid_e = tl.program_id(0)
    pid_s = tl.program_id(1)
    num_splits = tl.num_programs(1)
    experts = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    e_ok = experts < num_experts
    cols = pid_s * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = cols < hidden
    w_ptrs = w_ptr + experts.to(tl.int64)[:, None] * stride_we + cols[None, :]  # [BE, BK]
    w = tl.load(w_ptrs, mask=e_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
    pdl_prologue(USE_PDL)
    # NOTE: the weight tile is read once for every token.
    for t in range(num_tokens):
        a = tl.load(x_ptr + t * stride_xt + cols, mask=k_ok, other=0.0)  # [BK]
        part = tl.sum(w * a.to(tl.float32)[None, :], axis=1)  # [BE]
        tl.store(parts_ptr + (t * num_splits + pid_s) * num_experts + experts, part, mask=e_ok)


@triton.jit
def _kth_expert(logits, cols, rank, BLOCK_E: tl.constexpr):
    """The index of the ``rank``-th largest (from 0) of ``logits [BE]`` float32 (``-inf`` past
    the experts), the smallest index first among equals: ``softmax_topk``'s choice (softmax is
    monotonic), with one max per rank over unique keys (order-preserving bits of the value
    above the reversed index)."""
    bits = logits.to(tl.int32, bitcast=True)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # the floats' order as signed integers
    keys = (ordered.to(tl.int64) << 32) | (BLOCK_E - 1 - cols).to(tl.int64)  # [BE], unique
    # NOTE: a taken key drops to the int64 minimum, below every key (-inf's included).
    for _ in range(rank):
        keys = tl.where(keys == tl.max(keys, axis=0), -9223372036854775807 - 1, keys)
    return BLOCK_E - 1 - (tl.max(keys, axis=0) & 0xFFFFFFFF).to(tl.int32)


@triton.jit
def _gate_up_kernel(
    x_ptr,
    parts_ptr,
    w_ptr,
    act_ptr,
    topk_w_ptr,
    topk_ids_ptr,
    num_experts,
    num_splits,
    inter,
    hidden,
    stride_xt,
    stride_we,
    stride_wn,
    TOP_K: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_TOP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pair = tl.program_id(0)  # token t's j-th expert
    t = pair // TOP_K
    j = pair % TOP_K
    pid_n = tl.program_id(1)
    x_ptr += t.to(tl.int64) * stride_xt
    pdl_prologue(USE_PDL)
    # routing: the router's logits as its linear layer would return them
    splits = tl.arange(0, BLOCK_S)
    cols_e = tl.arange(0, BLOCK_E)
    e_ok = cols_e < num_experts
    p_ptrs = parts_ptr + (t * num_splits + splits[:, None]) * num_experts + cols_e[None, :]
    parts = tl.load(p_ptrs, mask=(splits < num_splits)[:, None] & e_ok[None, :], other=0.0)
    logits = tl.sum(parts, axis=0).to(x_ptr.dtype.element_ty).to(tl.float32)  # [BE]
    logits = tl.where(e_ok, logits, float("-inf"))
    n_blocks = tl.cdiv(inter, BLOCK_N)
    if pid_n == n_blocks:
        # NOTE: one extra program writes select_experts' weights and ids for the down GEMVs,
        # so the streaming programs only pick their own expert.
        if j == 0:
            one = tl.arange(0, 1) == 0
            top_w, top_i = softmax_topk(
                logits[None, :], one, cols_e, e_ok, TOP_K, RENORMALIZE, BLOCK_TOP
            )
            kcols = t * TOP_K + tl.arange(0, BLOCK_TOP)
            k_ok = (tl.arange(0, BLOCK_TOP) < TOP_K)[None, :]
            tl.store(topk_w_ptr + kcols[None, :], top_w, mask=k_ok)
            tl.store(topk_ids_ptr + kcols[None, :], top_i.to(tl.int64), mask=k_ok)
        return
    expert = _kth_expert(logits, cols_e, j, BLOCK_E).to(tl.int64)
    # the pair's gate and up GEMVs over H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < inter
    ks = tl.arange(0, BLOCK_K)
    g_rows = w_ptr + expert * stride_we + offs_n.to(tl.int64)[:, None] * stride_wn  # [BN, 1]
    u_rows = g_rows + inter * stride_wn
    acc_g = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        cols = k0 + ks
        if EVEN_K:
            g = tl.load(g_rows + cols[None, :], mask=n_ok[:, None], other=0.0)  # [BN, BK]
            u = tl.load(u_rows + cols[None, :], mask=n_ok[:, None], other=0.0)
            a = tl.load(x_ptr + cols)  # [BK]
        else:
            k_ok = cols < hidden
            g = tl.load(g_rows + cols[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            u = tl.load(u_rows + cols[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            a = tl.load(x_ptr + cols, mask=k_ok, other=0.0)
        af = a.to(tl.float32)[None, :]
        acc_g += g.to(tl.float32) * af
        acc_u += u.to(tl.float32) * af
    gate = tl.sum(acc_g, axis=1)  # [BN]
    up = tl.sum(acc_u, axis=1)
    act = gate / (1.0 + tl.exp(-gate)) * up  # silu(gate) * up
    tl.store(act_ptr + pair * inter + offs_n, act.to(act_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _down_w_tile(w_rows, k0, ks, r_ok, inter, EVEN_K: tl.constexpr):
    """Columns ``k0 + ks`` of the down weight rows ``w_rows [R]``: ``[R, BK]``, zero where
    masked (a whole tile past the end loads nothing)."""
    cols = k0 + ks
    if EVEN_K:
        mask = (r_ok & (k0 < inter))[:, None]
    else:
        mask = r_ok[:, None] & (cols < inter)[None, :]
    return tl.load(w_rows[:, None] + cols[None, :], mask=mask, other=0.0)


@triton.jit
def _down_kernel(
    act_ptr,
    w_ptr,
    topk_w_ptr,
    topk_ids_ptr,
    out_ptr,
    hidden,
    inter,
    stride_we,
    stride_wn,
    stride_ot,
    TOP_K: tl.constexpr,
    BLOCK_TOP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pid = tl.program_id(0)
    t = tl.program_id(1)  # the token
    act_ptr += t.to(tl.int64) * (TOP_K * inter)
    topk_w_ptr += t * TOP_K
    topk_ids_ptr += t * TOP_K
    out_ptr += t.to(tl.int64) * stride_ot
    # NOTE: one tile row per (pair j, output column n): every pair's weights stream in the same
    # load, so a program keeps TOP_K times more bytes in flight than one expert at a time.
    r = tl.arange(0, BLOCK_TOP * BLOCK_N)
    j = r // BLOCK_N  # [R]
    offs_n = pid * BLOCK_N + r % BLOCK_N  # [R]
    j_ok = j < TOP_K
    r_ok = j_ok & (offs_n < hidden)
    ks = tl.arange(0, BLOCK_K)
    pdl_prologue(USE_PDL)
    expert = tl.load(topk_ids_ptr + j, mask=j_ok, other=0)  # [R]
    weight = tl.load(topk_w_ptr + j, mask=j_ok, other=0.0)
    w_rows = w_ptr + expert * stride_we + offs_n.to(tl.int64) * stride_wn  # [R]
    a_rows = act_ptr + j * inter  # [R]
    w = _down_w_tile(w_rows, 0, ks, r_ok, inter, EVEN_K)
    acc = tl.zeros((BLOCK_TOP * BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, inter, BLOCK_K):
        cols = k0 + ks
        if EVEN_K:
            a = tl.load(a_rows[:, None] + cols[None, :], mask=j_ok[:, None], other=0.0)
        else:
            a_ok = j_ok[:, None] & (cols < inter)[None, :]
            a = tl.load(a_rows[:, None] + cols[None, :], mask=a_ok, other=0.0)
        w_now = w
        # NOTE: the next tile's load goes out before this one's products (two tiles in flight);
        # past the end it is masked off entirely.
        w = _down_w_tile(w_rows, k0 + BLOCK_K, ks, r_ok, inter, EVEN_K)
        # NOTE: the routing weight scales the activation, so one sum covers every expert.
        acc += w_now.to(tl.float32) * (a.to(tl.float32) * weight[:, None])  # [R, BK]
    per_row = tl.sum(acc, axis=1)  # [R]
    out = tl.sum(tl.reshape(per_row, (BLOCK_TOP, BLOCK_N)), axis=0)  # [BN]
    n_out = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    tl.store(out_ptr + n_out, out.to(out_ptr.dtype.element_ty), mask=n_out < hidden)


def token_moe(
    x: torch.Tensor,  # [T, H]
    gate_weight: torch.Tensor,  # [E, H] the router
    w13: torch.Tensor,  # [E, 2I, H]
    w2: torch.Tensor,  # [E, H, I]
    top_k: int,
    renormalize: bool,
    *,
    config: TokenMoeConfig | None = None,
    out: torch.Tensor | None = None,  # [T, H], written in full
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``fused_moe(x, w13, w2, *select_experts(x @ gate_weight.T, top_k, renormalize))`` for
    one to ``MAX_TOKENS`` tokens in three launches; returns ``(out [T, H], topk_weights [T, k]
    float32, topk_ids [T, k] int64)``."""
    num_experts, two_inter, hidden = w13.shape
    inter = two_inter // 2
    if x.dim() != 2 or not 1 <= x.shape[0] <= MAX_TOKENS or x.shape[1] != hidden:
        raise ValueError(
            f"token_moe takes x [T, {hidden}] with 1 <= T <= {MAX_TOKENS}, got {tuple(x.shape)}"
        )
    num_tokens = x.shape[0]
    if tuple(gate_weight.shape) != (num_experts, hidden):
        raise ValueError(
            f"the router must be [{num_experts}, {hidden}], got {tuple(gate_weight.shape)}"
        )
    if two_inter % 2 or tuple(w2.shape) != (num_experts, hidden, inter):
        raise ValueError(
            f"MoE shapes disagree: w13 {tuple(w13.shape)} (want [E, 2I, H]), "
            f"w2 {tuple(w2.shape)} (want [E, H, I])"
        )
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"`top_k` must be in [1, {num_experts}], got {top_k}")
    for name, w in (("gate_weight", gate_weight), ("w13", w13), ("w2", w2)):
        if w.dtype != x.dtype:
            raise ValueError(f"`{name}` must be {x.dtype} here, got {w.dtype}")
        if w.stride(-1) != 1:
            raise ValueError(f"`{name}` needs a contiguous last dimension")
    cfg = config or (_FLOAT32 if x.dtype == torch.float32 else DEFAULT_CONFIG)
    dev = x.device
    if x.stride(-1) != 1:
        x = x.contiguous()
    if out is None:
        out = torch.empty((num_tokens, hidden), dtype=x.dtype, device=dev)
    elif out.shape != x.shape or out.dtype != x.dtype or out.stride(-1) != 1:
        raise ValueError("`out` must be a [T, H] tensor in x.dtype with a contiguous last dim")
    num_splits = triton.cdiv(hidden, cfg.router_block_k)
    if num_splits > _MAX_SPLITS:
        raise ValueError(
            f"the router splits H={hidden} into {num_splits} > {_MAX_SPLITS} parts; "
            f"raise `router_block_k` (now {cfg.router_block_k})"
        )
    # [T, S, E]
    parts = torch.empty((num_tokens, num_splits, num_experts), dtype=torch.float32, device=dev)
    weights = torch.empty((num_tokens, top_k), dtype=torch.float32, device=dev)  # [T, k]
    ids = torch.empty((num_tokens, top_k), dtype=torch.int64, device=dev)  # [T, k]
    act = torch.empty((num_tokens * top_k, inter), dtype=x.dtype, device=dev)  # [T*k, I]
    use_pdl = pdl(x)
    _router_kernel[(triton.cdiv(num_experts, cfg.router_block_e), num_splits)](
        x,
        gate_weight,
        parts,
        num_tokens,
        num_experts,
        hidden,
        x.stride(0),
        gate_weight.stride(0),
        BLOCK_E=cfg.router_block_e,
        BLOCK_K=cfg.router_block_k,
        USE_PDL=use_pdl,
        num_warps=4,
        launch_pdl=use_pdl,
    )
    # NOTE: one column block more than I needs: its program (0, last) writes the routing.
    _gate_up_kernel[(num_tokens * top_k, triton.cdiv(inter, cfg.block_n1) + 1)](
        x,
        parts,
        w13,
        act,
        weights,
        ids,
        num_experts,
        num_splits,
        inter,
        hidden,
        x.stride(0),
        w13.stride(0),
        w13.stride(1),
        TOP_K=top_k,
        RENORMALIZE=renormalize,
        BLOCK_S=triton.next_power_of_2(num_splits),
        BLOCK_E=triton.next_power_of_2(num_experts),
        BLOCK_TOP=triton.next_power_of_2(top_k),
        BLOCK_N=cfg.block_n1,
        BLOCK_K=cfg.block_k1,
        EVEN_K=hidden % cfg.block_k1 == 0,
        USE_PDL=use_pdl,
        num_warps=cfg.num_warps,
        num_stages=cfg.stages1,
        launch_pdl=use_pdl,
    )
    _down_kernel[(triton.cdiv(hidden, cfg.block_n2), num_tokens)](
        act,
        w2,
        weights,
        ids,
        out,
        hidden,
        inter,
        w2.stride(0),
        w2.stride(1),
        out.stride(0),
        TOP_K=top_k,
        BLOCK_TOP=triton.next_power_of_2(top_k),
        BLOCK_N=cfg.block_n2,
        BLOCK_K=cfg.block_k2,
        EVEN_K=inter % cfg.block_k2 == 0,
        USE_PDL=use_pdl,
        num_warps=cfg.num_warps,
        num_stages=1,
        launch_pdl=use_pdl,
    )
    return out, weights, ids
