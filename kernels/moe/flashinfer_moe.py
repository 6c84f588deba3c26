"""``flashinfer_cutlass``: FlashInfer's CUTLASS fused MoE (TensorRT-LLM's kernels), bfloat16.

``flashinfer.fused_moe.cutlass_fused_moe`` takes ``fc1 [E, 2I, H]`` and ``fc2 [E, H, I]``, the
shapes of outrider's ``w13`` and ``w2``, but its SwiGLU reads the *first* I rows of each expert's
fc1 as the linear (up) projection and the *last* I rows as the gate: ``[up; gate]``, the reverse
of outrider's ``[gate; up]``. The backend therefore runs on a copy of ``w13`` with the halves
swapped, built once per weight tensor and cached on it (rebuilt if the tensor is written again);
that copy is the price of the backend, one ``w13`` (two thirds of the expert weights) per layer.
Routing ids go in as int32, routing weights as float32; the finalize (weighted sum over the top
k) is the deterministic unfused one.

The registry offers it for bfloat16 without quantization on sm89, sm90 and sm100+ only (the
archs FlashInfer builds this module for). Its first use JIT-builds a large CUTLASS module (over
9 minutes on 16 cores on an H100; cached in ``~/.cache/flashinfer`` afterwards), so ``triton``
stays the MoE path that always works.
"""

from __future__ import annotations

import torch

from outrider.kernels.moe.torch_ref import select_experts

# NOTE: CUTLASS grouped GEMMs load 16-byte vectors: H and I must be multiples of 8 bf16 values.
_ALIGN = 8
_FC1_ATTR = "_outrider_flashinfer_fc1"


def _version(t: torch.Tensor) -> int:
    try:
        return int(t._version)
    except RuntimeError:  # inference tensors carry no version counter
        return -1


def up_gate_weights(w13: torch.Tensor) -> torch.Tensor:
    """``w13 [E, 2I, H]`` (gate rows above up rows) as FlashInfer's fc1 ``[E, 2I, H]`` (up
    rows above gate rows); cached on ``w13`` until it is written again."""
    key = (w13.data_ptr(), _version(w13), tuple(w13.shape))
    cached = getattr(w13, _FC1_ATTR, None)
    if cached is not None and cached[0] == key:
        return cached[1]
    inter = w13.shape[1] // 2
    fc1 = torch.cat([w13[:, inter:], w13[:, :inter]], dim=1).contiguous()  # [E, 2I, H]
    setattr(w13, _FC1_ATTR, (key, fc1))
    return fc1


class FlashInferCutlassMoeBackend:
    """``fused_moe`` with the interface of the torch reference (``w13`` is ``[gate; up]``)."""

    name = "flashinfer_cutlass"

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
        topk_weights: torch.Tensor,  # [T, k]
        topk_ids: torch.Tensor,  # [T, k]
    ) -> torch.Tensor:
        hidden, inter = w2.shape[1], w2.shape[2]
        if x.dtype != torch.bfloat16 or w13.dtype != x.dtype or w2.dtype != x.dtype:
            raise ValueError(
                f"flashinfer_cutlass runs bfloat16 activations and weights, got x {x.dtype}, "
                f"w13 {w13.dtype}, w2 {w2.dtype}"
            )
        if hidden % _ALIGN or inter % _ALIGN:
            raise ValueError(
                f"flashinfer_cutlass needs hidden and intermediate sizes that are multiples of "
                f"{_ALIGN}, got {hidden} and {inter}"
            )
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)  # [T, H]
        if x.shape[0] == 0:
            return out
        from flashinfer.fused_moe import cutlass_fused_moe

        cutlass_fused_moe(
            x.contiguous(),
            topk_ids.to(torch.int32).contiguous(),
            topk_weights.to(torch.float32).contiguous(),
            up_gate_weights(w13),
            w2.contiguous(),
            x.dtype,
            quant_scales=None,
            output=out,
            # NOTE: the fused finalize sums the top-k outputs with atomics (order varies by run).
            use_fused_finalize=False,
        )
        return out


BACKEND = FlashInferCutlassMoeBackend()
