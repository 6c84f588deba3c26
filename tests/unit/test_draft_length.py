"""Draft length by load: acceptance estimate, online cost fit, goodput choice, switch-off point."""

from __future__ import annotations

import random

import pytest

from outrider.cluster.config import load_config
from outrider.cluster.draft_length import (
    OUTLIER_RUN,
    AcceptanceEstimate,
    FixedDraftLength,
    GoodputDraftLength,
    OnlineLinear,
    build_draft_length_policy,
    lookahead,
)
from outrider.workers.config import ConfigError
from outrider.workers.spec_config import GoodputConfig, SpeculativeConfig


def outcomes(cond: list[float], k: int, n: int, rng: random.Random) -> list[tuple[int, int]]:
    """(num_draft, num_accepted) of n sequences drafting k with conditional rates ``cond``."""
    out = []
    for _ in range(n):
        acc = 0
        while acc < k and rng.random() < cond[acc]:
            acc += 1
        out.append((k, acc))
    return out


def test_acceptance_estimate_recovers_conditional_rates_under_varying_k() -> None:
    cond = [0.8, 0.5, 0.3, 0.9]
    est = AcceptanceEstimate(4, prior=0.1, weight=1.0, decay=1.0)
    rng = random.Random(0)
    for r in range(400):
        est.observe(outcomes(cond, 1 + r % 4, 16, rng))  # k varies round to round
    got = est.conditional()
    for i, c in enumerate(cond):
        assert got[i] == pytest.approx(c, abs=0.06), (i, got)
    uncond = est.unconditional()
    assert uncond[1] == pytest.approx(got[0] * got[1])


def test_acceptance_prior_rules_until_measured_and_decay_forgets() -> None:
    est = AcceptanceEstimate(3, prior=0.6, weight=1.0, decay=0.5)
    assert est.conditional() == pytest.approx([0.6] * 3)
    for _ in range(30):
        est.observe([(3, 3)] * 8)
    assert est.conditional()[0] > 0.95  # (16 + 0.6) / (16 + 1) at steady state
    for _ in range(30):
        est.observe([(3, 0)] * 8)  # acceptance collapses: the old rounds are forgotten
    assert est.conditional()[0] < 0.05
    assert est.conditional()[1] > 0.9  # position 1 was not reached since: its old value stays


def test_online_linear_fit_overrides_a_wrong_prior() -> None:
    model = OnlineLinear((0.05, 0.005), [(1, 1), (1, 128)], weight=0.5, decay=0.99)
    assert model.predict((1, 10)) == pytest.approx(0.1)
    rng = random.Random(1)
    for _ in range(300):
        n = rng.choice([4, 8, 16, 32])
        model.observe((1, n), 0.02 + 0.001 * n)
    assert model.predict((1, 1)) == pytest.approx(0.021, rel=0.05)
    assert model.predict((1, 100)) == pytest.approx(0.12, rel=0.05)
    # measured at one point only: that point is fitted, the prior shapes the rest
    single = OnlineLinear((0.05, 0.005), [(1, 1), (1, 128)], weight=0.5, decay=0.99)
    for _ in range(300):
        single.observe((1, 8), 0.028)
    assert single.predict((1, 8)) == pytest.approx(0.028, rel=0.05)
    assert single.predict((1, 64)) > single.predict((1, 8))


def test_a_one_off_stall_is_left_out() -> None:
    """A stall timed as one verify (a second, against 5 ms steps) does not move the fit; a run
    of ``OUTLIER_RUN`` such observations does (the costs changed)."""
    model = OnlineLinear((0.01, 5e-5), [(1, 1), (1, 128)], weight=4.0, decay=0.98)
    rng = random.Random(2)

    def steps(n: int) -> None:
        for _ in range(n):
            q = rng.randint(1, 5)
            model.observe((1, q), 0.0046 + 1e-4 * q)

    steps(100)
    before = model.predict((1, 5))
    assert 0.004 < before < 0.008
    model.observe((1, 5), 1.0)
    assert model.predict((1, 5)) == before  # fitted, it would be 7x
    steps(30)
    assert model.predict((1, 5)) == pytest.approx(before, rel=0.1)
    for _ in range(OUTLIER_RUN + 10):
        model.observe((1, 5), 0.05)
    assert model.predict((1, 5)) > 2 * before


def _policy(
    max_k: int, *, acceptance: float, overlap: bool = False, **priors: float
) -> GoodputDraftLength:
    cfg = GoodputConfig(
        acceptance_prior=acceptance, prior_weight=1e6, probe_interval=0, **priors
    )  # NOTE: a huge prior weight pins the model to the given priors for pure-logic checks
    return GoodputDraftLength(max_k, cfg, overlap=overlap)


def test_switch_off_point_matches_the_closed_form() -> None:
    a, b, d0, d1, c = 0.01, 1e-4, 0.001, 0.002, 0.7
    pol = _policy(
        1,
        acceptance=c,
        verify_base_s=a,
        verify_per_token_s=b,
        draft_base_s=d0,
        draft_per_step_s=d1,
        draft_per_token_s=0.0,
        draft_per_context_token_s=0.0,
    )
    # k=1 wins while B (1 + c) / (a + 2 b B + d0 + d1) > B / (a + b B)
    b_star = (a * c - d0 - d1) / (b * (1 - c))
    assert 10 < b_star < 200
    for batch in (1, 2, int(b_star) - 1):
        assert pol.best(batch) == 1, batch
    for batch in (int(b_star) + 2, 2 * int(b_star), 1000):
        assert pol.best(batch) == 0, batch


def test_measured_round_overhead_of_drafting_moves_the_switch_off_point() -> None:
    """Time a drafting round spends outside both calls counts against drafting."""
    pol = _policy(
        1,
        acceptance=0.7,
        verify_base_s=0.01,
        verify_per_token_s=1e-4,
        draft_base_s=0.001,
        draft_per_step_s=0.002,
        draft_per_token_s=0.0,
    )
    assert pol.best(8) == 1
    for _ in range(200):
        pol.observe_round(0, 1e-4)
        pol.observe_round(1, 0.004)
    assert pol.overhead_s[1] == pytest.approx(0.004) and pol.best(8) == 0
    assert pol.best(1) == 1  # one sequence still gains more than the overhead costs
    pol.observe_round(1, 10.0)  # a stall is capped
    assert pol.overhead_s[1] < 0.0045


def test_k_shrinks_with_load_and_never_predicts_slower_than_plain() -> None:
    pol = _policy(
        6,
        acceptance=0.8,
        verify_base_s=0.02,
        verify_per_token_s=2e-4,
        draft_base_s=0.001,
        draft_per_step_s=0.0005,
        draft_per_token_s=1e-5,
    )
    chosen = [pol.best(batch) for batch in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)]
    assert chosen[0] >= 3 and chosen[-1] == 0
    assert all(x >= y for x, y in zip(chosen, chosen[1:], strict=False)), chosen
    for batch in (1, 8, 64, 512):
        k = pol.best(batch)
        assert pol.goodput(k, batch) >= pol.goodput(0, batch)


def test_no_acceptance_means_no_drafting() -> None:
    pol = _policy(4, acceptance=0.0)
    assert [pol.best(b) for b in (1, 4, 64)] == [0, 0, 0]
    assert pol.expected_tokens(4) == pytest.approx(1.0)


def test_overlap_hides_drafting_when_drafts_hold() -> None:
    kw = dict(
        verify_base_s=0.02,
        verify_per_token_s=1e-5,
        draft_base_s=0.001,
        draft_per_step_s=0.004,
        draft_per_token_s=0.0,
    )
    plain = _policy(4, acceptance=0.999, **kw)
    over = _policy(4, acceptance=0.999, overlap=True, **kw)
    t_plain, t_over = plain.round_time(4, 1), over.round_time(4, 1)
    assert t_over < t_plain
    assert t_over == pytest.approx(max(0.02 + 5e-5, 0.001 + 0.02), rel=0.02)
    # with no acceptance every prepared draft is dropped: the re-draft is paid in full
    miss = _policy(4, acceptance=0.0, overlap=True, **kw)
    assert miss.round_time(4, 1) >= plain.round_time(4, 1) - 1e-9


def test_probing_cycles_through_other_lengths() -> None:
    cfg = GoodputConfig(acceptance_prior=0.0, prior_weight=1e6, probe_interval=3)
    pol = GoodputDraftLength(3, cfg)
    ks = [pol.choose(8) for _ in range(18)]
    assert [k for i, k in enumerate(ks) if (i + 1) % 3] == [0] * 12  # best is plain decoding
    assert [ks[i] for i in range(2, 18, 3)] == [1, 2, 3, 1, 2, 3]
    assert pol.choose(0) == pol.last  # a batch of prefills keeps the last choice


def test_learns_the_cost_of_drafting_from_observations() -> None:
    """Prior: drafting is free. Truth: each draft step costs as much as a verify. It stops."""
    cfg = GoodputConfig(
        acceptance_prior=0.5,
        draft_base_s=0.0,
        draft_per_step_s=0.0,
        draft_per_token_s=0.0,
        verify_base_s=0.01,
        verify_per_token_s=1e-4,
        prior_weight=2.0,
        decay=0.98,
        probe_interval=5,
    )
    pol = GoodputDraftLength(4, cfg)
    assert pol.best(8) >= 3
    rng = random.Random(2)
    for _ in range(200):
        k = pol.choose(8)
        n = 8 * (1 + k)
        pol.observe_verify(n, 0.01 + 1e-4 * n)
        if k:
            pol.observe_draft(k, 8 * k, 0.002 + 0.011 * k)
            pol.observe_acceptance(outcomes([0.5] * 4, k, 8, rng))
    assert pol.best(8) == 0
    assert pol.goodput(0, 8) > pol.goodput(1, 8)


def test_first_call_stalls_do_not_switch_drafting_off() -> None:
    """The first drafter calls stall (kernels compiled on first use, 0.5 s each, five in a row):
    they are left out, so drafting stays on at H200-like costs (batch 1), and catch-ups after
    probes at k = 0 are fitted with their context."""
    pol = GoodputDraftLength(4, GoodputConfig())
    rng = random.Random(3)
    cond = [0.72, 0.5 / 0.72, 0.33 / 0.5, 0.22 / 0.33]  # bench_peer's synthetic rates
    stalls, since, chosen = 5, 0, []
    for _ in range(600):
        k = pol.choose(1)
        chosen.append(k)
        since += 1
        pol.observe_verify(1 + k, 0.0046 + 4e-5 * (1 + k))
        if k:
            context, since = since, 0
            seconds = 0.5 if stalls else 0.0022 + 2e-5 * context
            stalls = max(stalls - 1, 0)
            pol.observe_draft(k, k, seconds, context)
            pol.observe_acceptance(outcomes(cond, k, 1, rng))
        pol.observe_round(k, 3e-4 if k else 1e-4)
    assert stalls == 0 and chosen.count(0) < len(chosen) // 10
    assert pol._draft_time(1, 4) < 0.005


def test_fixed_policy_and_builder() -> None:
    assert FixedDraftLength(5).choose(100) == 5
    fixed = SpeculativeConfig(method="ngram", num_speculative_tokens=4)
    assert isinstance(build_draft_length_policy(fixed), FixedDraftLength)
    assert isinstance(build_draft_length_policy(None), FixedDraftLength)
    goodput = SpeculativeConfig(
        method="ngram", num_speculative_tokens=4, draft_length_policy="goodput", overlap=True
    )
    pol = build_draft_length_policy(goodput)
    assert isinstance(pol, GoodputDraftLength) and pol.overlap and pol.max_k == 4
    assert lookahead(fixed) == 5 and lookahead(goodput) == 10 and lookahead(None) == 1


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        ({"draft_length_policy": "greedy"}, r"draft_length_policy"),
        ({"goodput": {"decay": 0.0}}, r"`speculative.goodput.decay` must be in \(0, 1\], got 0.0"),
        (
            {"goodput": {"acceptance_prior": 1.5}},
            r"`speculative.goodput.acceptance_prior` must be in \[0, 1\], got 1.5",
        ),
        (
            {"goodput": {"verify_base_s": -1.0}},
            r"`speculative.goodput.verify_base_s` must be >= 0, got -1.0",
        ),
        ({"goodput": {"probe_interval": -2}}, r"`speculative.goodput.probe_interval` must be"),
        ({"goodput": {"bogus": 1}}, r"unknown key `speculative.goodput.bogus`"),
    ],
)
def test_config_errors(extra: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(
            None, {"speculative": {"method": "ngram", "num_speculative_tokens": 3, **extra}}
        )
