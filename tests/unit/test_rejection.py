"""Rejection sampling: strict and probabilistic verification against references and statistics."""

from __future__ import annotations

from collections.abc import Callable

import torch

from outrider.kernels.sampling.ops import exponential_race
from outrider.kernels.sampling.torch_ref import (
    BACKEND,
    rejection_sample,
    rejection_sample_strict,
)

V = 6
K = 2
# Target p per absolute position (context-independent) and a clearly different drafter q.
P_BY_POS = torch.tensor(
    [
        [0.30, 0.25, 0.20, 0.10, 0.10, 0.05],
        [0.05, 0.15, 0.30, 0.10, 0.25, 0.15],
        [0.20, 0.20, 0.20, 0.20, 0.10, 0.10],
    ],
    dtype=torch.float64,
)  # [3, V]
Q = torch.tensor([0.05, 0.10, 0.10, 0.20, 0.25, 0.30], dtype=torch.float64)  # [V]


def chi_square_p_value(counts: torch.Tensor, expected_probs: torch.Tensor) -> float:
    """Pearson chi-square goodness of fit; p-value from the regularized upper gamma."""
    counts = counts.to(torch.float64).flatten()
    expected = expected_probs.to(torch.float64).flatten() * counts.sum()
    stat = ((counts - expected) ** 2 / expected).sum()
    dof = torch.tensor(counts.numel() - 1, dtype=torch.float64)
    return float(torch.special.gammaincc(dof / 2, stat / 2))


def strict_reference(drafts: list[int], n: int, targets: list[int]) -> list[int]:
    out = []
    for i in range(n):
        if drafts[i] != targets[i]:
            return [*out, targets[i]]
        out.append(drafts[i])
    return [*out, targets[n]]


def probabilistic_reference(
    b: int,
    drafts: torch.Tensor,
    n: int,
    q: torch.Tensor | None,
    p: torch.Tensor,
    u: torch.Tensor,
    noise: torch.Tensor,
    bonus: int,
) -> list[int]:
    out: list[int] = []
    for i in range(n):
        d = int(drafts[b, i])
        pd = float(p[b, i, d])
        qd = 1.0 if q is None else float(q[b, i, d])
        if pd > 0 and float(u[b, i]) <= pd / qd:
            out.append(d)
            continue
        if q is None:
            w = p[b, i].clone()
            w[d] = 0.0
        else:
            w = (p[b, i] - q[b, i]).clamp_min(0.0)
        if not bool((w > 0).any()):
            w = p[b, i]
        e = noise[b] if noise.dim() == 2 else noise[b, i]
        return [*out, int(torch.where(w > 0, w / e, -1.0).argmax())]
    return [*out, bonus]


def padded(rows: list[list[int]], width: int) -> torch.Tensor:
    return torch.tensor([r + [-1] * (width - len(r)) for r in rows], dtype=torch.int64)


def random_case(
    gen: torch.Generator,
    b: int,
    k: int,
    v: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    n = torch.randint(0, k + 1, (b,), generator=gen)  # [B]
    n[0], n[1] = 0, k
    drafts = torch.randint(0, v, (b, k), generator=gen)  # [B, K]
    drafts[torch.arange(k)[None, :] >= n[:, None]] = -1
    q = torch.rand(b, k, v, generator=gen, dtype=torch.float64) ** 3  # [B, K, V]
    q = q / q.sum(-1, keepdim=True)
    p = torch.rand(b, k + 1, v, generator=gen, dtype=torch.float64) ** 3  # [B, K+1, V]
    p = p / p.sum(-1, keepdim=True)
    return n, drafts, q, p


def test_strict_matches_reference() -> None:
    gen = torch.Generator().manual_seed(0)
    b, k, v = 300, 5, 3
    n, drafts, _, _ = random_case(gen, b, k, v)
    targets = torch.randint(0, v, (b, k + 1), generator=gen)  # [B, K+1]
    n[2], n[3] = k, k
    drafts[2] = targets[2, :k]  # all accepted -> bonus
    drafts[3] = targets[3, :k]
    drafts[3, 0] = (targets[3, 0] + 1) % v  # first position rejected
    out, acc = rejection_sample_strict(drafts, n, targets)
    rows = [strict_reference(drafts[i].tolist(), int(n[i]), targets[i].tolist()) for i in range(b)]
    assert torch.equal(out, padded(rows, k + 1))
    assert torch.equal(acc, torch.tensor([len(r) - 1 for r in rows]))
    assert int(acc[0]) == 0 and out[0, 0] == targets[0, 0]
    assert int(acc[2]) == k and out[2, k] == targets[2, k]
    assert int(acc[3]) == 0 and out[3, 0] == targets[3, 0]
    out0, acc0 = BACKEND.rejection_sample_strict(
        torch.empty(2, 0, dtype=torch.int64),
        torch.zeros(2, dtype=torch.int64),
        torch.tensor([[4], [5]]),
    )
    assert out0.tolist() == [[4], [5]] and acc0.tolist() == [0, 0]


def test_probabilistic_matches_per_row_reference() -> None:
    gen = torch.Generator().manual_seed(1)
    b, k, v = 400, 4, 5
    n, drafts, q, p = random_case(gen, b, k, v)
    u = torch.rand(b, k, generator=gen)  # [B, K]
    u[5] = 0.0
    bonus = torch.randint(0, v, (b,), generator=gen)  # [B]
    for noise in (
        torch.empty(b, v).exponential_(generator=gen),
        torch.empty(b, k, v).exponential_(generator=gen),
    ):
        for draft_probs in (q, None):
            out, acc = rejection_sample(drafts, n, draft_probs, p, u, noise, bonus)
            rows = [
                probabilistic_reference(
                    i, drafts, int(n[i]), draft_probs, p, u, noise, int(bonus[i])
                )
                for i in range(b)
            ]
            assert torch.equal(out, padded(rows, k + 1))
            assert torch.equal(acc, torch.tensor([len(r) - 1 for r in rows]))
            assert 0 < int(acc.sum()) < int(n.sum())
    out32, acc32 = rejection_sample(drafts, n, q.float(), p.float(), u, noise.float(), bonus)
    assert out32.shape == (b, k + 1) and acc32.dtype == torch.int64
    out0, acc0 = rejection_sample(
        torch.empty(b, 0, dtype=torch.int64),
        torch.zeros(b),
        None,
        p[:, :1],
        torch.empty(b, 0),
        noise[:, :0],
        bonus,
    )
    assert torch.equal(out0[:, 0], bonus) and int(acc0.sum()) == 0


def test_greedy_target_reduces_to_strict() -> None:
    gen = torch.Generator().manual_seed(2)
    b, k, v = 200, 4, 3
    n, drafts, q, p = random_case(gen, b, k, v)
    targets = p.argmax(-1)  # [B, K+1]
    one_hot = torch.nn.functional.one_hot(targets, v).to(torch.float64)  # [B, K+1, V]
    u = torch.rand(b, k, generator=gen)
    noise = torch.empty(b, v).exponential_(generator=gen)
    bonus = targets[torch.arange(b), n]
    strict = rejection_sample_strict(drafts, n, targets)
    for draft_probs in (None, q):
        got = rejection_sample(drafts, n, draft_probs, one_hot, u, noise, bonus)
        assert torch.equal(got[0], strict[0]) and torch.equal(got[1], strict[1])


def _round(
    start: torch.Tensor,
    draw_drafts: Callable[[int], torch.Tensor],
    use_q: bool,
    per_position_noise: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One verification round per row starting at absolute position ``start`` [B]."""
    b = start.numel()
    n = torch.randint(0, K + 1, (b,))  # [B]
    drafts = draw_drafts(b)  # [B, K]
    drafts[torch.arange(K)[None, :] >= n[:, None]] = -1
    abs_pos = (start[:, None] + torch.arange(K + 1)[None, :]).clamp(max=P_BY_POS.shape[0] - 1)
    p = P_BY_POS[abs_pos]  # [B, K+1, V]
    q = Q.expand(b, K, V) if use_q else None
    u = torch.rand(b, K)  # [B, K]
    noise_shape = (b, K, V) if per_position_noise else (b, V)
    noise = torch.empty(noise_shape, dtype=torch.float64).exponential_()
    bonus_p = p[torch.arange(b), n]  # [B, V]
    bonus = exponential_race(bonus_p, torch.empty(b, V, dtype=torch.float64).exponential_())
    return rejection_sample(drafts, n, q, p, u, noise, bonus)


def _check_first_two_tokens(
    draw_drafts: Callable[[int], torch.Tensor],
    use_q: bool,
    per_position_noise: bool,
) -> torch.Tensor:
    rows = 60_000
    out, acc = _round(torch.zeros(rows, dtype=torch.int64), draw_drafts, use_q, per_position_noise)
    first = out[:, 0]  # [N]
    second = out[:, 1].clone()  # [N]
    short = acc == 0  # [N] rows that emitted one token need a second round
    out2, _ = _round(
        torch.ones(int(short.sum()), dtype=torch.int64), draw_drafts, use_q, per_position_noise
    )
    second[short] = out2[:, 0]
    assert bool((first >= 0).all()) and bool((second >= 0).all())
    p_first = chi_square_p_value(torch.bincount(first, minlength=V), P_BY_POS[0])
    pair = torch.bincount(first * V + second, minlength=V * V)  # [V*V]
    p_pair = chi_square_p_value(pair, torch.outer(P_BY_POS[0], P_BY_POS[1]))
    assert p_first > 1e-3, p_first
    assert p_pair > 1e-3, p_pair
    return acc


def test_output_distribution_is_the_target_with_draft_probs() -> None:
    torch.manual_seed(3)
    acc = _check_first_two_tokens(
        lambda b: torch.multinomial(Q.expand(b, V), K, replacement=True), True, False
    )
    assert acc.max() == K


def test_output_distribution_is_the_target_with_one_hot_q() -> None:
    torch.manual_seed(4)
    drafter = torch.tensor([0.0, 0.0, 0.1, 0.0, 0.2, 0.7], dtype=torch.float64)
    _check_first_two_tokens(
        lambda b: torch.multinomial(drafter.expand(b, V), K, replacement=True), False, True
    )


def test_acceptance_rate_is_sum_of_min_p_q() -> None:
    torch.manual_seed(5)
    b = 50_000
    drafts = torch.multinomial(Q.expand(b, V), 1, replacement=True)  # [B, 1]
    p = P_BY_POS[:2].expand(b, 2, V)
    _, acc = rejection_sample(
        drafts,
        torch.ones(b, dtype=torch.int64),
        Q.expand(b, 1, V),
        p,
        torch.rand(b, 1),
        torch.empty(b, V).exponential_(),
        torch.zeros(b, dtype=torch.int64),
    )
    expected = float(torch.minimum(P_BY_POS[0], Q).sum())
    assert abs(float(acc.double().mean()) - expected) < 4 * (expected / b) ** 0.5


def test_p_equal_q_accepts_every_draft() -> None:
    gen = torch.Generator().manual_seed(6)
    b, k, v = 500, 4, 7
    p = torch.rand(b, k + 1, v, generator=gen) ** 2  # [B, K+1, V]
    p = p / p.sum(-1, keepdim=True)
    n = torch.randint(0, k + 1, (b,), generator=gen)
    drafts = torch.multinomial(p[:, :k].reshape(-1, v), 1, generator=gen).view(b, k)
    drafts[torch.arange(k)[None, :] >= n[:, None]] = -1
    u = torch.rand(b, k, generator=gen)
    u[:, 0] = 1.0 - 2**-24
    bonus = torch.randint(0, v, (b,), generator=gen)
    out, acc = rejection_sample(drafts, n, p[:, :k], p, u, torch.empty(b, v).exponential_(), bonus)
    assert torch.equal(acc, n)
    assert torch.equal(out[:, :k][drafts >= 0], drafts[drafts >= 0])
    assert torch.equal(out[torch.arange(b), n], bonus)


def test_draft_with_zero_target_prob_is_always_rejected() -> None:
    gen = torch.Generator().manual_seed(7)
    b = 20_000
    p = torch.tensor([0.4, 0.0, 0.3, 0.3])  # token 1 impossible for the target
    q = torch.tensor([0.1, 0.6, 0.1, 0.2])
    drafts = torch.ones(b, 1, dtype=torch.int64)
    u = torch.rand(b, 1, generator=gen)
    u[:100] = 0.0
    for draft_probs in (q.expand(b, 1, 4), None):
        out, acc = rejection_sample(
            drafts,
            torch.ones(b, dtype=torch.int64),
            draft_probs,
            p.expand(b, 2, 4),
            u,
            torch.empty(b, 4).exponential_(generator=gen),
            torch.ones(b, dtype=torch.int64),
        )
        assert int(acc.sum()) == 0
        assert bool((out[:, 0] != 1).all()) and bool((out[:, 1] == -1).all())
        residual = (p - q).clamp_min(0) if draft_probs is not None else p
        counts = torch.bincount(out[:, 0], minlength=4)
        keep = residual > 0
        assert chi_square_p_value(counts[keep], residual[keep] / residual.sum()) > 1e-3


def test_no_residual_mass_falls_back_to_p() -> None:
    b = 4_000
    p = torch.tensor([0.5, 0.5, 0.0])
    q = torch.tensor([0.5, 0.5, 0.2])  # NOTE: q >= p everywhere, so max(p - q, 0) is all zero
    out, acc = rejection_sample(
        torch.full((b, 1), 2),
        torch.ones(b, dtype=torch.int64),
        q.expand(b, 1, 3),
        p.expand(b, 2, 3),
        torch.rand(b, 1),
        torch.empty(b, 3).exponential_(),
        torch.zeros(b, dtype=torch.int64),
    )
    counts = torch.bincount(out[:, 0], minlength=3)
    assert int(acc.sum()) == 0 and int(counts[2]) == 0
    assert 1_800 < int(counts[0]) < 2_200
