"""Triton KV write (vLLM's reshape_and_cache) for the paged cache.

``_write_kv_kernel``: one program per new token copies its ``[nKV, hd]`` key and value rows to
the flat cache slot ``slot_mapping[t]``; slots < 0 are skipped. ``torch_ref.write_kv`` is the
reference (bit for bit: a copy with a cast).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from outrider.kernels.fused.dispatch import pdl
from outrider.kernels.fused.pdl import pdl_prologue


@triton.jit
def _write_kv_kernel(
    k_ptr,
    v_ptr,
    kc_ptr,
    vc_ptr,
    slot_ptr,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_kcb,
    stride_kcs,
    stride_kch,
    stride_vcb,
    stride_vcs,
    stride_vch,
    block_size,
    NUM_KV: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pdl_prologue(USE_PDL)
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:
        return
    blk = slot // block_size
    off = slot % block_size
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = (h < NUM_KV) & (d < HEAD_DIM)
    k = tl.load(k_ptr + t * stride_kt + h * stride_kh + d, mask=mask)
    v = tl.load(v_ptr + t * stride_vt + h * stride_vh + d, mask=mask)
    tl.store(
        kc_ptr + blk * stride_kcb + off * stride_kcs + h * stride_kch + d,
        k.to(kc_ptr.dtype.element_ty),
        mask=mask,
    )
    tl.store(
        vc_ptr + blk * stride_vcb + off * stride_vcs + h * stride_vch + d,
        v.to(vc_ptr.dtype.element_ty),
        mask=mask,
    )


def write_kv(
    k: torch.Tensor,  # [T, nKV, hd]
    v: torch.Tensor,  # [T, nKV, hd]
    k_cache: torch.Tensor,  # [N, bs, nKV, hd]
    v_cache: torch.Tensor,  # [N, bs, nKV, hd]
    slot_mapping: torch.Tensor,  # [T] int; < 0 = skip
) -> None:
    """Store new keys and values at their flat cache slots; slots < 0 are skipped."""
    t = k.shape[0]
    if t == 0:
        return
    n_kv, hd = k_cache.shape[-2:]
    if k.stride(-1) != 1:
        k = k.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("the KV cache's last dimension must be contiguous")
    slots = slot_mapping.to(k.device)
    # NOTE: 8 KV heads x 128 = 1024 elements per token; 4 warps move one token in 2 passes.
    width = triton.next_power_of_2(n_kv) * triton.next_power_of_2(hd)
    use_pdl = pdl(k)
    _write_kv_kernel[(t,)](
        k,
        v,
        k_cache,
        v_cache,
        slots,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        k_cache.shape[1],
        NUM_KV=n_kv,
        HEAD_DIM=hd,
        BLOCK_H=triton.next_power_of_2(n_kv),
        BLOCK_D=triton.next_power_of_2(hd),
        USE_PDL=use_pdl,
        launch_pdl=use_pdl,
        num_warps=4 if width <= 2048 else 8,
    )
