"""Synthetic acceptance (benchmarks only): rate schedules, validation, empirical acceptance."""

from __future__ import annotations

import math

import pytest
import torch

from outrider.cluster.config import OutriderConfig, load_config
from outrider.workers.config import ConfigError
from outrider.workers.proposers.factory import resolve_speculative
from outrider.workers.spec_config import SpeculativeConfig
from outrider.workers.synthetic import (
    conditional_rates,
    draw_synthetic_uniforms,
    rates_from_length,
    synthetic_accept,
    synthetic_generator,
)


def binomial_ok(hits: int, n: int, p: float, z: float = 5.0) -> bool:
    """|hits/n - p| within z standard deviations (exact when p is 0 or 1)."""
    sd = math.sqrt(max(p * (1 - p), 0.0) / n)
    return abs(hits / n - p) <= z * sd + 1e-12


@pytest.mark.parametrize(
    ("length", "k", "want"),
    [
        (3.78, 7, (1.0, 1.0, 0.78, 0.0, 0.0, 0.0, 0.0)),
        (1.0, 3, (0.0, 0.0, 0.0)),
        (4.0, 3, (1.0, 1.0, 1.0)),
        (1.5, 1, (0.5,)),
        (2.0, 4, (1.0, 0.0, 0.0, 0.0)),
    ],
)
def test_length_resolves_to_the_minimum_variance_schedule(
    length: float, k: int, want: tuple[float, ...]
) -> None:
    rates = rates_from_length(length, k)
    assert rates == pytest.approx(want)
    assert 1 + sum(rates) == pytest.approx(length)


def test_conditional_rates() -> None:
    assert conditional_rates([0.8, 0.4, 0.1, 0.0, 0.0]) == pytest.approx([0.8, 0.5, 0.25, 0.0, 0.0])


def test_empirical_acceptance_matches_the_rates() -> None:
    rates = [0.9, 0.6, 0.45, 0.1]
    k, b, rounds = len(rates), 500, 20
    cond = conditional_rates(rates)
    gens = [synthetic_generator(i, None) for i in range(b)]
    accepted_at = torch.zeros(k, dtype=torch.int64)
    total = 0
    for _ in range(rounds):
        drafts = torch.randint(0, 50, (b, k))
        target = torch.randint(50, 100, (b, k + 1))  # never equal to a draft
        n_draft = torch.full((b,), k)
        out, n_acc = synthetic_accept(
            drafts, n_draft, target, draw_synthetic_uniforms([k] * b, k, gens), cond
        )
        for row in range(b):
            n = int(n_acc[row])
            assert out[row, :n].tolist() == drafts[row, :n].tolist()
            assert int(out[row, n]) == int(target[row, n])
            assert (out[row, n + 1 :] == -1).all()
        accepted_at += torch.stack([(n_acc > i).sum() for i in range(k)])
        total += b
    for i, r in enumerate(rates):
        assert binomial_ok(int(accepted_at[i]), total, r), (i, int(accepted_at[i]) / total, r)


def test_fewer_drafts_than_k_and_reproducible_streams() -> None:
    cond = conditional_rates([1.0, 1.0, 1.0])
    drafts = torch.tensor([[5, 6, -1], [7, -1, -1], [-1, -1, -1]])
    target = torch.tensor([[10, 11, 12, 13], [20, 21, 22, 23], [30, 31, 32, 33]])
    n_draft = torch.tensor([2, 1, 0])
    gens = [synthetic_generator(i, 3) for i in range(3)]
    out, n_acc = synthetic_accept(
        drafts, n_draft, target, draw_synthetic_uniforms([2, 1, 0], 3, gens), cond
    )
    assert n_acc.tolist() == [2, 1, 0]  # rate 1 accepts every draft there is, no more
    assert out.tolist() == [[5, 6, 12, -1], [7, 21, -1, -1], [30, -1, -1, -1]]
    a = draw_synthetic_uniforms([3], 3, [synthetic_generator(4, 9)])
    b = draw_synthetic_uniforms([3], 3, [synthetic_generator(5, 9)])
    c = draw_synthetic_uniforms([3], 3, [synthetic_generator(4, None)])
    assert torch.equal(a, b)  # a seeded request's stream depends on its seed alone
    assert not torch.equal(a, c)


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        ({}, r"needs exactly one of `speculative.synthetic_acceptance_rates` or"),
        (
            {"synthetic_acceptance_rates": [0.5, 0.4, 0.3], "synthetic_acceptance_length": 2.0},
            r"needs exactly one of",
        ),
        (
            {"synthetic_acceptance_length": 4.5},
            r"`speculative.synthetic_acceptance_length` must "
            r"be in \[1, 4\], got 4.5",
        ),
        ({"synthetic_acceptance_length": 0.5}, r"must be in \[1, 4\], got 0.5"),
        ({"synthetic_acceptance_rates": [0.5, 0.4]}, r"must have num_speculative_tokens \(3\)"),
        (
            {"synthetic_acceptance_rates": [0.5, 0.6, 0.3]},
            r"must be non-increasing, got 0.5 "
            r"then 0.6",
        ),
        ({"synthetic_acceptance_rates": [1.2, 0.6, 0.3]}, r"entries must be in \[0, 1\], got 1.2"),
    ],
)
def test_validation_errors(extra: dict[str, object], match: str) -> None:
    data = {"method": "ngram", "num_speculative_tokens": 3, "verification": "synthetic", **extra}
    with pytest.raises(ConfigError, match=match):
        load_config(None, {"speculative": data})


@pytest.mark.parametrize("verification", [None, "strict", "probabilistic"])
@pytest.mark.parametrize(
    "extra", [{"synthetic_acceptance_length": 2.0}, {"synthetic_acceptance_rates": [0.5] * 3}]
)
def test_refused_unless_set_explicitly(verification: str | None, extra: dict[str, object]) -> None:
    data: dict[str, object] = {"method": "ngram", "num_speculative_tokens": 3, **extra}
    if verification is not None:
        data["verification"] = verification
    with pytest.raises(ConfigError, match=r"applies only with `speculative.verification: synth"):
        load_config(None, {"speculative": data})


def test_never_a_default() -> None:
    spec = SpeculativeConfig(method="ngram", num_speculative_tokens=3)
    assert spec.verification != "synthetic" and spec.synthetic_rates() is None
    resolved = resolve_speculative(spec)
    assert resolved is not None and resolved.verification == "probabilistic"
    cfg = OutriderConfig(
        speculative=SpeculativeConfig(
            method="ngram",
            num_speculative_tokens=3,
            verification="synthetic",
            synthetic_acceptance_length=2.5,
        )
    ).validate()
    assert cfg.speculative is not None
    assert cfg.speculative.synthetic_rates() == pytest.approx((1.0, 0.5, 0.0))
