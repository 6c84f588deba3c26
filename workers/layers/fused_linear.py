"""A projection together with the layer op in front of it: one skinny GEMM launch where it wins.

``norm_linear`` is ``linear(norm(x + residual))`` (the decoder layer's input and post-attention
norms before q/k/v and gate_up), ``silu_mul_linear`` is ``down(silu(gate) * up)``. Where the
skinny GEMM table has an entry for the call (decode-sized row counts on a GPU it was tuned on:
``kernels/fused/skinny_table.py``), the op runs as the GEMM's prologue; elsewhere the two modules
run one after the other, exactly as before.
"""

from __future__ import annotations

import torch
from torch import nn

from outrider.workers.layers.linear import LinearBase
from outrider.workers.layers.norm import RMSNorm


def norm_linear(
    norm: RMSNorm,
    linear: LinearBase,
    x: torch.Tensor,  # [T, K]
    residual: torch.Tensor | None,  # [T, K]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(linear(norm(x + residual)), x + residual)``; with no residual, ``x`` is the residual."""
    prologue = "norm" if residual is None else "add_norm"
    cfg = linear.skinny_config(x, prologue)
    if cfg is not None and norm.weight.dtype == x.dtype and norm.weight.device == x.device:
        out, res = linear.fused_forward(
            x, cfg, prologue, norm_weight=norm.weight, residual=residual, eps=norm.eps
        )
        return out, (x if res is None else res)
    if residual is None:
        return linear(norm(x)), x
    h, residual = norm(x, residual)
    return linear(h), residual


def silu_mul_linear(linear: LinearBase, act: nn.Module, gate_up: torch.Tensor) -> torch.Tensor:
    """``linear(act(gate_up))`` for the gated SiLU ``act`` on ``gate_up [T, 2I]``."""
    cfg = linear.skinny_config(gate_up, "silu_mul")
    if cfg is not None:
        return linear.fused_forward(gate_up, cfg, "silu_mul")[0]
    return linear(act(gate_up))
