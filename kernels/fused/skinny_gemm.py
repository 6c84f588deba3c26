"""Skinny GEMM for decode-sized row counts, with the op before it fused in (and the reference).

``out [M, N] = prologue(x) [M, K] @ weight [N, K]^T (+ bias)`` for ``M <= 16`` rows, where the
prologue is one of:

- ``none``: ``x [M, K]`` as it is;
- ``norm``: RMSNorm of ``x`` (``kernels/fused/norm.py`` semantics, same roundings);
- ``add_norm``: RMSNorm of ``x + residual``; the sum (the new residual) is also returned;
- ``silu_mul``: ``silu(x[:, :K]) * x[:, K:]`` of the merged ``x [M, 2K]`` gate_up output
  (``kernels/fused/activation.py`` semantics).

At one to sixteen rows a projection streams its whole weight once, so its time is the weight
bytes over the memory bandwidth. cuBLAS picks tiles that leave SMs idle on some of the decoder's
shapes (6144 or 4096 output columns), and the ops around a projection are launches of their own.
Here one program owns ``BLOCK_N`` output columns and walks all of K: with one row the products
accumulate in a ``[BLOCK_N, BLOCK_K]`` float32 tile (no tensor cores, nothing padded), with more
rows they go through ``tl.dot`` on a 16-row tile. The norm prologue first reads the row for its
mean of squares (a few KiB from L2; a single row of up to 8192 in one load), then normalises
each K tile as it loads it; program 0 writes the new residual.

Which projections take this path, and with which tiles: ``skinny_table.py``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from outrider.kernels.fused.activation import silu_and_mul_ref
from outrider.kernels.fused.dispatch import pdl
from outrider.kernels.fused.norm import fused_add_rms_norm_ref, rms_norm_ref
from outrider.kernels.fused.pdl import pdl_prologue
from outrider.kernels.fused.skinny_table import (
    DEFAULT_CONFIG_ONE_ROW,
    DEFAULT_CONFIG_ROWS,
    MAX_ROWS,
    PROLOGUES,
    Prologue,
    SkinnyConfig,
)

_PROLOGUE_ID = {p: i for i, p in enumerate(PROLOGUES)}
_DOT_ROWS = 16  # the row tile of the tl.dot path (its smallest M)
_NORM_ROW_MAX = 8192  # widest row whose norm statistics one program loads at once


def skinny_gemm_ref(
    x: torch.Tensor,  # [M, K] or [M, 2K] for silu_mul
    weight: torch.Tensor,  # [N, K]
    bias: torch.Tensor | None = None,
    *,
    prologue: Prologue = "none",
    norm_weight: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The unfused ops: ``(out [M, N], new residual or None)``."""
    res_out = None
    if prologue == "norm":
        assert norm_weight is not None
        a = rms_norm_ref(x, norm_weight, eps)
    elif prologue == "add_norm":
        assert norm_weight is not None and residual is not None
        a, res_out = fused_add_rms_norm_ref(x, residual, norm_weight, eps)
    elif prologue == "silu_mul":
        a = silu_and_mul_ref(x)
    else:
        a = x
    return torch.nn.functional.linear(a, weight, bias), res_out


@triton.jit
def _a_tile(
    x_rows,
    res_rows,
    g_ptr,
    cols,
    m_ok,
    k_ok,
    inv,
    K,
    PROLOGUE: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    """The prologue's output for columns ``cols`` of every row, in x's dtype: [BM, BK]."""
    mask = m_ok[:, None] & k_ok[None, :]
    if PROLOGUE == 3:
        gate = tl.load(x_rows + cols[None, :], mask=mask, other=0.0)
        up = tl.load(x_rows + K + cols[None, :], mask=mask, other=0.0)
        g = gate.to(tl.float32)
        silu = tl.math.div_rn(g, 1.0 + tl.exp(-g)).to(gate.dtype).to(tl.float32)
        a = (silu * up.to(tl.float32)).to(gate.dtype)
    else:
        x = tl.load(x_rows + cols[None, :], mask=mask, other=0.0)
        if PROLOGUE == 0:
            a = x
        else:
            xf = x.to(tl.float32)
            if PROLOGUE == 2:
                r = tl.load(res_rows + cols[None, :], mask=mask, other=0.0)
                xf = (xf + r.to(tl.float32)).to(x.dtype).to(tl.float32)
            normed = (xf * inv[:, None]).to(x.dtype).to(tl.float32)
            if EVEN_K:
                g = tl.load(g_ptr + cols).to(tl.float32)
            else:
                g = tl.load(g_ptr + cols, mask=k_ok, other=0.0).to(tl.float32)
            a = (g[None, :] * normed).to(x.dtype)
    return a


@triton.jit
def _acc_tile(acc, a, w, USE_DOT: tl.constexpr, DOT_IEEE: tl.constexpr):
    """One K tile into the accumulator: ``acc + a @ w.T`` [BM, BN] through tl.dot, or for one
    row the elementwise products ``acc + w * a`` [BN, BK], summed over K at the end."""
    if not USE_DOT:
        acc = acc + w.to(tl.float32) * a.to(tl.float32)
    elif DOT_IEEE:
        acc = tl.dot(a, tl.trans(w), acc, input_precision="ieee")
    else:
        acc = tl.dot(a, tl.trans(w), acc)
    return acc


@triton.jit
def _skinny_gemm_kernel(
    x_ptr,
    res_ptr,
    g_ptr,
    w_ptr,
    b_ptr,
    out_ptr,
    res_out_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_rm,
    stride_wn,
    stride_om,
    eps,
    PROLOGUE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    USE_DOT: tl.constexpr,
    DOT_IEEE: tl.constexpr,
    NORM_BLOCK: tl.constexpr,
    EARLY_TILES: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = tl.arange(0, BLOCK_M)
    m_ok = rows < M
    rows64 = rows.to(tl.int64)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    ks = tl.arange(0, BLOCK_K)
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn  # [BN, 1]
    # NOTE: weights never depend on the previous kernel: the first tile is loaded before the
    # PDL wait, so its DRAM latency overlaps the previous kernel's tail instead of following it.
    w_first = tl.load(w_rows + ks[None, :], mask=n_ok[:, None] & (ks < K)[None, :], other=0.0)
    if EARLY_TILES > 1:
        ks2 = BLOCK_K + ks  # NOTE: the launcher asks for two only where K >= 2 * BLOCK_K
        w_second = tl.load(w_rows + ks2[None, :], mask=n_ok[:, None] & (ks2 < K)[None, :])
    pdl_prologue(USE_PDL)
    x_rows = x_ptr + rows64[:, None] * stride_xm  # [BM, 1]
    res_rows = res_ptr + rows64[:, None] * stride_rm
    inv = tl.zeros((BLOCK_M,), dtype=tl.float32)
    if PROLOGUE == 1 or PROLOGUE == 2:
        # NOTE: pass 1 over the row: the mean of squares of (x + residual) rounded to x's dtype.
        ss = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for k0 in range(0, K, NORM_BLOCK):
            cols = k0 + tl.arange(0, NORM_BLOCK)
            mask = m_ok[:, None] & (cols < K)[None, :]
            x = tl.load(x_rows + cols[None, :], mask=mask, other=0.0)
            xf = x.to(tl.float32)
            if PROLOGUE == 2:
                r = tl.load(res_rows + cols[None, :], mask=mask, other=0.0)
                s = (xf + r.to(tl.float32)).to(x.dtype)
                tl.store(
                    res_out_ptr + rows64[:, None] * K + cols[None, :], s, mask=mask & (pid == 0)
                )
                xf = s.to(tl.float32)
            ss += tl.sum(xf * xf, axis=1)
        inv = tl.math.div_rn(1.0, tl.sqrt_rn(tl.math.div_rn(ss, K * 1.0) + eps))
    if USE_DOT:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)  # (BLOCK_M == 1)
    # the tiles loaded above
    a = _a_tile(x_rows, res_rows, g_ptr, ks, m_ok, ks < K, inv, K, PROLOGUE, EVEN_K)
    acc = _acc_tile(acc, a, w_first, USE_DOT, DOT_IEEE)
    if EARLY_TILES > 1:
        a = _a_tile(x_rows, res_rows, g_ptr, ks2, m_ok, ks2 < K, inv, K, PROLOGUE, EVEN_K)
        acc = _acc_tile(acc, a, w_second, USE_DOT, DOT_IEEE)
    for k0 in range(EARLY_TILES * BLOCK_K, K, BLOCK_K):
        cols = k0 + ks
        if EVEN_K:
            k_ok = cols < k0 + BLOCK_K
            w = tl.load(w_rows + cols[None, :], mask=n_ok[:, None], other=0.0)  # [BN, BK]
        else:
            k_ok = cols < K
            w = tl.load(w_rows + cols[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        a = _a_tile(x_rows, res_rows, g_ptr, cols, m_ok, k_ok, inv, K, PROLOGUE, EVEN_K)
        acc = _acc_tile(acc, a, w, USE_DOT, DOT_IEEE)
    if not USE_DOT:
        acc = tl.reshape(tl.sum(acc, axis=1), (1, BLOCK_N))
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + rows64[:, None] * stride_om + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def skinny_gemm(
    x: torch.Tensor,  # [M, K] or [M, 2K] for silu_mul
    weight: torch.Tensor,  # [N, K]
    bias: torch.Tensor | None = None,
    *,
    prologue: Prologue = "none",
    norm_weight: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    eps: float = 1e-6,
    config: SkinnyConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``skinny_gemm_ref`` in one launch: ``(out [M, N], new residual for add_norm else None)``.

    The grid and tiles come from host integers, so the launch is CUDA-graph safe.
    """
    if prologue not in _PROLOGUE_ID:
        raise ValueError(f"`prologue` must be one of {', '.join(PROLOGUES)}, got {prologue!r}")
    if x.dim() != 2 or weight.dim() != 2:
        raise ValueError(
            f"x and weight must be 2-D, got {tuple(x.shape)} and {tuple(weight.shape)}"
        )
    m, n, k = x.shape[0], weight.shape[0], weight.shape[1]
    want_k = 2 * k if prologue == "silu_mul" else k
    if x.shape[1] != want_k:
        raise ValueError(
            f"x must have {want_k} columns for weight {tuple(weight.shape)}, got {x.shape[1]}"
        )
    if m > MAX_ROWS:
        raise ValueError(f"skinny_gemm takes at most {MAX_ROWS} rows, got {m}")
    if x.dtype != weight.dtype:
        raise ValueError(f"x is {x.dtype} but weight is {weight.dtype}")
    if prologue in ("norm", "add_norm"):
        if norm_weight is None or norm_weight.shape != (k,) or norm_weight.dtype != x.dtype:
            raise ValueError(f"`norm_weight` must be a ({k},) tensor of {x.dtype}")
    if prologue == "add_norm" and (
        residual is None or residual.shape != x.shape or residual.dtype != x.dtype
    ):
        raise ValueError(f"`residual` must be a {tuple(x.shape)} tensor of {x.dtype}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    res_out = torch.empty_like(x) if prologue == "add_norm" else None
    if residual is not None and residual.stride(-1) != 1:
        residual = residual.contiguous()
    if m == 0 or n == 0:
        return out, res_out
    cfg = config or (DEFAULT_CONFIG_ONE_ROW if m == 1 else DEFAULT_CONFIG_ROWS)
    use_dot = m > 1
    if use_dot and cfg.block_n < 16:
        # NOTE: tl.dot tiles are at least 16 wide; the tables never hold such an entry.
        cfg = SkinnyConfig(16, cfg.block_k, cfg.num_warps, cfg.num_stages)
    # NOTE: rows through tl.dot load two weight tiles before the PDL wait, one row one tile. H200,
    # Llama-3.1-8B steps at 4k keys, three alternations: two tiles took the 5-token verify at
    # batch 1 from 4980-5020 to 4951-4968 us and the batch-8 decode from 5805-5819 to 5764-5794;
    # for one row they cost 95-115 us per decode step (4656-4671 against 4546-4562).
    # NOTE: one row reads its whole statistics pass in one load (one L2 round trip, not K / BK).
    norm_block = triton.next_power_of_2(k) if m == 1 and k <= _NORM_ROW_MAX else cfg.block_k
    use_pdl = pdl(x)
    _skinny_gemm_kernel[(triton.cdiv(n, cfg.block_n),)](
        x,
        residual if residual is not None else x,
        norm_weight if norm_weight is not None else x,
        weight,
        bias if bias is not None else x,
        out,
        res_out if res_out is not None else out,
        m,
        n,
        k,
        x.stride(0),
        residual.stride(0) if residual is not None else 0,
        weight.stride(0),
        out.stride(0),
        eps,
        PROLOGUE=_PROLOGUE_ID[prologue],
        HAS_BIAS=bias is not None,
        BLOCK_M=_DOT_ROWS if use_dot else 1,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        EVEN_K=k % cfg.block_k == 0,
        USE_DOT=use_dot,
        DOT_IEEE=x.dtype == torch.float32,
        NORM_BLOCK=norm_block,
        EARLY_TILES=2 if use_dot and k >= 2 * cfg.block_k else 1,
        USE_PDL=use_pdl,
        launch_pdl=use_pdl,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return out, res_out
