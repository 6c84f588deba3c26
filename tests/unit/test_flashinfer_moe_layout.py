"""The [up; gate] fc1 copy that the flashinfer_cutlass MoE backend runs on (no GPU needed)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from outrider.kernels.moe.flashinfer_moe import up_gate_weights
from outrider.kernels.moe.torch_ref import moe_reference


def _swiglu_up_first(x: torch.Tensor, fc1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """One expert as FlashInfer's kernel reads fc1: first half linear (up), second half gate."""
    inter = w2.shape[1]
    h = F.linear(x, fc1)  # [M, 2I]
    return F.linear(h[:, :inter] * F.silu(h[:, inter:]), w2)


def test_fc1_read_up_first_is_outriders_expert_mlp() -> None:
    gen = torch.Generator().manual_seed(0)
    e, h, inter, t = 3, 16, 8, 5
    x = torch.randn(t, h, generator=gen, dtype=torch.float64)
    w13 = torch.randn(e, 2 * inter, h, generator=gen, dtype=torch.float64)
    w2 = torch.randn(e, h, inter, generator=gen, dtype=torch.float64)
    fc1 = up_gate_weights(w13)
    assert fc1.shape == w13.shape and fc1.is_contiguous()
    ids = torch.zeros(t, 1, dtype=torch.int64)
    for ex in range(e):
        ref = moe_reference(x, w13, w2, torch.ones(t, 1, dtype=torch.float64), ids + ex)
        assert torch.allclose(_swiglu_up_first(x, fc1[ex], w2[ex]), ref)
    # reading outrider's [gate; up] w13 up-first would be a different function
    assert not torch.allclose(
        _swiglu_up_first(x, w13[0], w2[0]), _swiglu_up_first(x, fc1[0], w2[0])
    )


def test_fc1_copy_is_cached_until_the_weight_is_written() -> None:
    w13 = torch.randn(2, 8, 4)
    fc1 = up_gate_weights(w13)
    assert up_gate_weights(w13) is fc1
    w13[1, 0, 0] += 1.0  # e.g. a weight reload
    fresh = up_gate_weights(w13)
    assert fresh is not fc1 and torch.equal(fresh[1, 4:], w13[1, :4])
    other = w13.clone()
    assert up_gate_weights(other) is not fresh
