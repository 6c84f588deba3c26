"""The grouped torch MoE kernel against the per-expert loop reference, expert routing, the
block alignment reference, fp8 weights and their backend resolution."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from outrider.kernels import registry
from outrider.kernels.moe.fp8 import dequantize_fp8, quantize_fp8_per_channel
from outrider.kernels.moe.torch_ref import (
    BACKEND,
    align_block_size,
    max_num_blocks,
    moe_reference,
    select_experts,
)

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


@pytest.mark.parametrize(("t", "e", "k", "block_m"), [(1, 8, 2, 16), (9, 8, 4, 4), (40, 5, 3, 16)])
def test_align_block_size_groups_every_pair_once(t: int, e: int, k: int, block_m: int) -> None:
    torch.manual_seed(t)
    _, ids = select_experts(torch.randn(t, e), k, renormalize=False)
    sorted_ids, expert_ids = align_block_size(ids, e, block_m)
    num_pairs = t * k
    assert sorted_ids.numel() == max_num_blocks(num_pairs, e, block_m) * block_m
    flat = ids.reshape(-1)
    real = sorted_ids[sorted_ids < num_pairs]
    assert sorted(real.tolist()) == list(range(num_pairs))  # every pair exactly once
    used = int((expert_ids >= 0).sum())
    assert bool((expert_ids[used:] == -1).all()) and bool(
        (sorted_ids[used * block_m :] == num_pairs).all()
    )
    for b in range(used):
        rows = sorted_ids[b * block_m : (b + 1) * block_m]
        rows = rows[rows < num_pairs]
        assert rows.numel() > 0 and bool((flat[rows.long()] == expert_ids[b]).all())
        assert rows.tolist() == sorted(rows.tolist())  # pair order inside an expert
    assert expert_ids[:used].tolist() == sorted(expert_ids[:used].tolist())


def test_fp8_per_channel_round_trip() -> None:
    torch.manual_seed(0)
    w = torch.randn(4, 24, 40) * torch.logspace(-3, 2, 24)[None, :, None]
    w[1, 3] = 0.0  # an all-zero channel
    q, scale = quantize_fp8_per_channel(w)
    assert (
        q.dtype == torch.float8_e4m3fn and scale.shape == (4, 24) and scale.dtype == torch.float32
    )
    back = dequantize_fp8(q, scale, torch.float32)
    assert bool((back[1, 3] == 0).all())
    # e4m3 keeps 3 mantissa bits: within 2^-4 of each channel's largest magnitude
    rel = (back - w).abs() / w.abs().amax(-1, keepdim=True).clamp_min(1e-30)
    assert float(rel.max()) <= 2.0**-4
    assert float(q.float().abs().amax()) == 448.0


def test_torch_loop_runs_fp8_and_torch_refuses_it() -> None:
    torch.manual_seed(0)
    x, w13, w2, weights, ids = _inputs(12, 8, 2, torch.float32)
    q13, s13 = quantize_fp8_per_channel(w13)
    q2, s2 = quantize_fp8_per_channel(w2)
    exact = moe_reference(
        x.double(),
        dequantize_fp8(q13, s13, torch.float64),
        dequantize_fp8(q2, s2, torch.float64),
        weights,
        ids,
    )
    out = registry.get("moe", "torch_loop").fused_moe(x, q13, q2, weights, ids, s13, s2)
    assert out.dtype == torch.float32 and _rel_err(out, exact) < 1e-5
    with pytest.raises(ValueError, match="unquantized weights only"):
        BACKEND.fused_moe(x, q13, q2, weights, ids, s13, s2)


def test_fp8_resolves_to_a_backend_that_takes_it() -> None:
    """An fp8 target and an unquantized drafter resolve to different MoE backends."""
    bf16 = torch.bfloat16
    assert registry.resolve("moe", "auto", "cpu", bf16, "none") == "torch"
    assert registry.resolve("moe", "auto", "cpu", bf16, "fp8") == "torch_loop"
    with pytest.raises(registry.BackendError, match="supports quantization none only"):
        registry.resolve("moe", "torch", "cpu", bf16, "fp8")
    if importlib.util.find_spec("triton") is not None:
        assert registry.resolve("moe", "auto", "cuda", bf16, "fp8") == "triton"
        assert registry.resolve("moe", "triton", "cuda", torch.float32, "fp8") == "triton"
