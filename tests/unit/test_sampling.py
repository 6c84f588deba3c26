"""Sampling: top-k/top-p masks, temperature, greedy rows, seeded draws, the sampled distribution."""

from __future__ import annotations

import pytest
import torch

from outrider.kernels import registry
from outrider.kernels.sampling import torch_ref
from outrider.kernels.sampling.ops import (
    SamplingTensors,
    apply_top_k_top_p,
    compute_probs,
    draw_exponential,
    draw_rejection_randoms,
    draw_uniform,
)

NEG_INF = float("-inf")


def chi_square_p_value(counts: torch.Tensor, expected_probs: torch.Tensor) -> float:
    """Pearson chi-square goodness of fit; p-value from the regularized upper gamma."""
    counts = counts.to(torch.float64).flatten()
    expected = expected_probs.to(torch.float64).flatten() * counts.sum()
    stat = ((counts - expected) ** 2 / expected).sum()
    dof = torch.tensor(counts.numel() - 1, dtype=torch.float64)
    return float(torch.special.gammaincc(dof / 2, stat / 2))


def brute_force_keep(row: torch.Tensor, k: int, p: float) -> torch.Tensor:
    """Kept set of one row [V] by the definition: k-th value threshold, then mass strictly above."""
    v = row.numel()
    keep = torch.ones(v, dtype=torch.bool)
    if 0 < k < v:
        kth = sorted(row.tolist(), reverse=True)[k - 1]
        keep = row >= kth
    if p < 1.0:
        probs = torch.softmax(row.masked_fill(~keep, NEG_INF), dim=0)
        top = probs.max()
        new_keep = torch.zeros(v, dtype=torch.bool)
        for t in range(v):
            if keep[t]:
                above = probs[probs > probs[t]].sum()
                new_keep[t] = bool(above < p) or bool(probs[t] == top)
        keep = new_keep
    return keep


def random_params(n: int, v: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    ks = torch.randint(-1, v + 3, (n,), generator=gen)  # [N] includes disabled values
    ps = torch.rand(n, generator=gen, dtype=torch.float64)  # [N]
    ps[::5] = 1.0
    ps[1::7] = 0.0
    ps[2::9] = 1e-9
    return ks, ps


@pytest.mark.parametrize("ties", [False, True])
def test_top_k_top_p_matches_brute_force(ties: bool) -> None:
    gen = torch.Generator().manual_seed(1 + ties)
    n, v = 200, 12
    if ties:
        logits = torch.randint(-3, 3, (n, v), generator=gen).to(torch.float64)  # [N, V]
    else:
        logits = torch.randn(n, v, generator=gen, dtype=torch.float64) * 2  # [N, V]
    logits[3, 5:] = NEG_INF
    ks, ps = random_params(n, v, gen)
    out = apply_top_k_top_p(logits, ks, ps)  # [N, V]
    for i in range(n):
        keep = brute_force_keep(logits[i], int(ks[i]), float(ps[i]))
        assert torch.equal(out[i] > NEG_INF, keep & (logits[i] > NEG_INF)), (i, ks[i], ps[i])
        assert torch.equal(out[i][keep], logits[i][keep])
    assert torch.equal(apply_top_k_top_p(logits, None, None), logits)


def test_top_k_only_and_top_p_only() -> None:
    gen = torch.Generator().manual_seed(3)
    n, v = 64, 10
    logits = torch.randn(n, v, generator=gen, dtype=torch.float64)  # [N, V]
    ks, ps = random_params(n, v, gen)
    only_k = apply_top_k_top_p(logits, ks, None)
    only_p = apply_top_k_top_p(logits, None, ps)
    for i in range(n):
        assert torch.equal(only_k[i] > NEG_INF, brute_force_keep(logits[i], int(ks[i]), 1.0))
        assert torch.equal(only_p[i] > NEG_INF, brute_force_keep(logits[i], 0, float(ps[i])))


def test_top_k_keeps_boundary_ties_and_top_p_keeps_at_least_one() -> None:
    logits = torch.tensor([[1.0, 3.0, 2.0, 2.0, 0.0]])  # [1, V]
    out = apply_top_k_top_p(logits, torch.tensor([2]), None)
    assert (out > NEG_INF).tolist() == [[False, True, True, True, False]]
    out = apply_top_k_top_p(logits, None, torch.tensor([0.0]))
    assert (out > NEG_INF).tolist() == [[False, True, False, False, False]]


def test_compute_probs_temperature_top_k_top_p() -> None:
    gen = torch.Generator().manual_seed(4)
    n, v = 50, 16
    logits = torch.randn(n, v, generator=gen, dtype=torch.float64) * 3  # [N, V]
    temp = torch.rand(n, generator=gen, dtype=torch.float64) * 2 + 0.1  # [N]
    ks, ps = random_params(n, v, gen)
    probs = compute_probs(logits, temp)
    torch.testing.assert_close(probs, torch.softmax(logits / temp[:, None], -1))
    probs = compute_probs(logits, temp, ks, ps)  # [N, V]
    assert probs.dtype == torch.float64
    for i in range(n):
        scaled = logits[i] / temp[i]
        keep = brute_force_keep(scaled, int(ks[i]), float(ps[i]))
        ref = torch.softmax(scaled.masked_fill(~keep, NEG_INF), 0)
        torch.testing.assert_close(probs[i], ref)


def test_greedy_rows_are_one_hot_and_dtypes() -> None:
    logits = torch.tensor([[0.0, 2.0, 2.0, 1.0], [5.0, 1.0, 0.0, 5.0]], dtype=torch.bfloat16)
    probs = compute_probs(
        logits, torch.tensor([0.0, 0.0]), torch.tensor([3, 0]), torch.tensor([0.5, 1.0])
    )
    assert probs.dtype == torch.float32
    # NOTE: greedy ties go to the lowest token id, like torch.argmax.
    assert probs.tolist() == [[0.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]
    st = SamplingTensors.from_lists([0.0, 0.0], device="cpu")
    assert st.all_greedy and not st.all_random and st.no_top_k and st.no_top_p
    assert torch_ref.sample(logits.float(), st).tolist() == [1, 0]


def test_top_k_one_with_tied_maxima_keeps_both() -> None:
    logits = torch.tensor([[5.0, 1.0, 0.0, 5.0]])
    probs = compute_probs(logits, torch.tensor([1.0]), torch.tensor([1]), None)
    assert probs[0].tolist() == [0.5, 0.0, 0.0, 0.5]


def test_compute_probs_3d_broadcasts_per_request_params() -> None:
    gen = torch.Generator().manual_seed(5)
    b, s, v = 4, 3, 9
    logits = torch.randn(b, s, v, generator=gen)  # [B, S, V]
    temp = torch.tensor([0.0, 0.7, 1.0, 1.3])
    ks = torch.tensor([0, 3, 5, 100])
    ps = torch.tensor([1.0, 0.9, 0.5, 0.8])
    probs = compute_probs(logits, temp, ks, ps)  # [B, S, V]
    assert probs.shape == (b, s, v)
    for j in range(s):
        torch.testing.assert_close(probs[:, j], compute_probs(logits[:, j], temp, ks, ps))


def test_sample_mixed_batch_greedy_rows_are_argmax() -> None:
    gen = torch.Generator().manual_seed(6)
    logits = torch.randn(64, 50, generator=gen)  # [B, V]
    temps = [0.0 if i % 2 else 1.0 for i in range(64)]
    st = SamplingTensors.from_lists(temps, [10] * 64, [0.9] * 64, None, "cpu", vocab_size=50)
    assert not st.all_greedy and not st.all_random and not st.no_top_k
    tokens = torch_ref.sample(logits, st)  # [B]
    assert tokens.dtype == torch.int64
    assert torch.equal(tokens[1::2], logits[1::2].argmax(-1))
    probs = compute_probs(logits, st.temperature, st.top_k, st.top_p)
    assert bool((probs[torch.arange(64), tokens] > 0).all())


def _seeded_tokens(seed: int, position: int, batch: int, other_seeds: bool, steps: int) -> list:
    v = 1000
    logits = torch.zeros(batch, v)  # [B, V] uniform: every token equally likely
    gens: list[torch.Generator | None] = [
        torch.Generator().manual_seed(100 + i) if other_seeds else None for i in range(batch)
    ]
    gens[position] = torch.Generator().manual_seed(seed)
    st = SamplingTensors.from_lists([1.0] * batch, [0] * batch, [1.0] * batch, gens, "cpu")
    out = []
    for _ in range(steps):
        out.append(int(torch_ref.sample(logits, st)[position]))
    return out


def test_seeded_request_reproducible_whatever_the_batch() -> None:
    alone = _seeded_tokens(1234, 0, 1, False, 8)
    assert _seeded_tokens(1234, 3, 8, False, 8) == alone
    assert _seeded_tokens(1234, 5, 6, True, 8) == alone
    assert _seeded_tokens(4321, 0, 1, False, 8) != alone


def test_draws_per_row_generators() -> None:
    gens = [torch.Generator().manual_seed(7), None, torch.Generator().manual_seed(8)]
    u = draw_uniform((3, 4), gens, "cpu")  # [B, 3, 4]
    e = draw_exponential((5,), gens, "cpu", torch.float64)  # [B, 5]
    assert u.shape == (3, 3, 4) and e.shape == (3, 5) and e.dtype == torch.float64
    assert bool(((u >= 0) & (u < 1)).all()) and bool((e >= 0).all())
    again = draw_uniform((3, 4), [torch.Generator().manual_seed(7)], "cpu")
    assert torch.equal(again[0], u[0])
    assert not torch.equal(u[0], u[2])
    assert draw_uniform((2,), [None, None], "cpu").shape == (2, 2)


def test_rejection_randoms_depend_only_on_the_request() -> None:
    def draw(max_k: int, n: list[int], pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        gens: list[torch.Generator | None] = [None] * len(n)
        gens[pos] = torch.Generator().manual_seed(9)
        u, noise = draw_rejection_randoms(n, max_k, 7, gens, "cpu")
        return u[pos], noise[pos]

    u1, e1 = draw(3, [3], 0)
    u2, e2 = draw(5, [5, 3, 1], 1)
    assert torch.equal(u1, u2[:3]) and torch.equal(e1, e2)
    assert u2[3:].tolist() == [1.0, 1.0]


def test_sampled_distribution_matches_processed_probs() -> None:
    torch.manual_seed(10)
    n, v = 40_000, 8
    row = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])  # [V]
    logits = row.expand(n, v).contiguous()  # [N, V]
    st = SamplingTensors.from_lists([0.8] * n, [6] * n, [0.95] * n, None, "cpu", vocab_size=v)
    tokens = torch_ref.sample(logits, st)  # [N]
    probs = compute_probs(logits[:1], st.temperature[:1], st.top_k[:1], st.top_p[:1])[0]
    counts = torch.bincount(tokens, minlength=v)
    kept = probs > 0
    assert int(counts[~kept].sum()) == 0
    assert chi_square_p_value(counts[kept], probs[kept]) > 1e-3


def test_backend_is_registered() -> None:
    backend = registry.get("sampling", "torch")
    assert backend is torch_ref.BACKEND and backend.name == "torch"
    assert registry.resolve("sampling", "auto", "cpu", torch.float32) == "torch"
    logits = torch.tensor([[0.0, 3.0, 1.0]])
    st = SamplingTensors.from_lists([0.0])
    assert backend.sample(logits, st).tolist() == [1]
    assert backend.compute_probs(logits, st).tolist() == [[0.0, 1.0, 0.0]]
