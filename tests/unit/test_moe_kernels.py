"""The grouped torch MoE kernel against the per-expert loop reference, and expert routing."""

from __future__ import annotations

import pytest
import torch

from outrider.kernels import registry
from outrider.kernels.moe.torch_ref import BACKEND, moe_reference, select_experts

HIDDEN, INTER = 48, 24


def _inputs(t: int, e: int, k: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, HIDDEN, generator=g, dtype=torch.float64).to(dtype)
    w13 = (torch.randn(e, 2 * INTER, HIDDEN, generator=g, dtype=torch.float64) * 0.2).to(dtype)
    w2 = (torch.randn(e, HIDDEN, INTER, generator=g, dtype=torch.float64) * 0.2).to(dtype)
    logits = torch.randn(t, e, generator=g, dtype=torch.float64).to(dtype)
    weights, ids = select_experts(logits, k, renormalize=True)
    return x, w13, w2, weights, ids


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


@pytest.mark.parametrize("t", [1, 3, 17, 64])
@pytest.mark.parametrize(("e", "k"), [(8, 2), (32, 4), (128, 8)])
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-13), (torch.float32, 1e-5)])
def test_grouped_matches_loop(t: int, e: int, k: int, dtype: torch.dtype, tol: float) -> None:
    torch.manual_seed(0)
    x, w13, w2, weights, ids = _inputs(t, e, k, dtype, seed=t * 1000 + e)
    out = BACKEND.fused_moe(x, w13, w2, weights, ids)
    ref = moe_reference(x, w13, w2, weights, ids)
    assert out.shape == (t, HIDDEN) and out.dtype == dtype
    assert _rel_err(out, ref) < tol


def test_bfloat16_close_to_float64_loop() -> None:
    torch.manual_seed(0)
    x, w13, w2, weights, ids = _inputs(16, 16, 4, torch.float64)
    ref = moe_reference(x, w13, w2, weights, ids)
    out = BACKEND.fused_moe(x.bfloat16(), w13.bfloat16(), w2.bfloat16(), weights, ids)
    assert out.dtype == torch.bfloat16
    assert _rel_err(out, ref) < 3e-2


def test_loop_reference_is_the_plain_formula() -> None:
    torch.manual_seed(0)
    x, w13, w2, weights, ids = _inputs(5, 8, 2, torch.float64)
    expected = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            gate, up = w13[e, :INTER] @ x[t], w13[e, INTER:] @ x[t]
            expected[t] += weights[t, j] * (w2[e] @ (torch.nn.functional.silu(gate) * up))
    assert _rel_err(moe_reference(x, w13, w2, weights, ids), expected) < 1e-14


def test_no_tokens() -> None:
    x, w13, w2, weights, ids = _inputs(0, 8, 2, torch.float32)
    assert BACKEND.fused_moe(x, w13, w2, weights, ids).shape == (0, HIDDEN)


def test_select_experts() -> None:
    torch.manual_seed(0)
    logits = torch.randn(9, 16, dtype=torch.float64)
    w, ids = select_experts(logits, 4, renormalize=False)
    assert w.dtype == torch.float32 and ids.dtype == torch.int64 and w.shape == (9, 4)
    probs = torch.softmax(logits.float(), dim=-1)
    assert torch.equal(ids, probs.topk(4).indices)
    assert torch.allclose(w, probs.gather(1, ids))
    w_norm, ids_norm = select_experts(logits, 4, renormalize=True)
    assert torch.equal(ids_norm, ids)
    assert torch.allclose(w_norm.sum(-1), torch.ones(9))
    # Mixtral: softmax over the top-k logits == softmax -> top-k -> renormalise
    mixtral = torch.softmax(logits.gather(1, ids).float(), dim=-1)
    assert torch.allclose(w_norm, mixtral, atol=1e-6)


def test_registry_returns_the_torch_backend() -> None:
    backend = registry.get("moe", "torch")
    assert backend is BACKEND and backend.name == "torch"
