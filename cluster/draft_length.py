"""How many tokens to draft each round: fixed, or chosen by load for the most tokens per second.

``GoodputDraftLength`` picks k in [0, num_speculative_tokens] for each round from

- the acceptance it has measured: per draft position i, the conditional rate c_i (accepted
  given that position i was drafted and every earlier draft was accepted), an exponentially
  weighted count ratio pulled toward ``acceptance_prior``; the expected tokens of a sequence
  are 1 + sum_{i <= k} prod_{j <= i} c_j;
- a cost model of the round fitted online from call times: the target's call as
  ``a + b * N`` for N query tokens in the batch (rounds without prefills), the drafter's call
  as ``d0 + d1 * k + d2 * sum_k + d3 * C`` (k = sequential steps, sum_k = tokens drafted over
  the batch, C = confirmed tokens the call ingests: what the last round confirmed in steady
  drafting, many more in the catch-up after rounds at k = 0); both are exponentially weighted
  least squares with the configured prior entered as pseudo-observations, so the prior rules
  until measurements disagree with it, and each observation is capped at a few times its
  prediction (one-off stalls); calls that captured CUDA graphs are not observed at all;
- the time a round spends outside both calls, apart for plain and drafting rounds.

It returns the k with the highest predicted tokens per second; k = 0 is plain decoding (the
drafter is not called), so a batch is never predicted slower than without speculation. Every
``probe_interval`` rounds it tries another k (round robin) so that the fit and the acceptance
of positions it would not otherwise draft stay measured.

With overlap, a round costs max(verify, ahead draft of k + 1) when its driver runs the two
calls at the same time (their sum when it runs them in turn) plus the re-draft that follows a
miss: the prepared drafts are used only if all k drafts and the drafter's guess of the bonus
token are confirmed, which happens with probability about prod_{j <= k + 1} c_j.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from outrider.workers.spec_config import GoodputConfig, SpeculativeConfig


class DraftLengthPolicy(Protocol):
    max_k: int

    def choose(self, num_decode: int, num_other_tokens: int = 0) -> int:
        """k for a round with ``num_decode`` drafting sequences (+ other query tokens)."""
        ...

    def observe_acceptance(self, drafted: Sequence[tuple[int, int]]) -> None:
        """(num_draft, num_accepted) of each sequence that drafted this round."""
        ...

    def observe_verify(self, num_tokens: int, seconds: float) -> None: ...

    def observe_draft(
        self, num_steps: int, num_tokens: int, seconds: float, context_tokens: int = 0
    ) -> None:
        """A drafter call: k sequential steps, tokens drafted over the batch, and the confirmed
        tokens it ingested over the batch (a catch-up after rounds at k = 0 ingests many)."""
        ...

    def observe_round(self, k: int, overhead_s: float) -> None:
        """The round's wall time outside both calls' forwards, for a round that drafted k."""
        ...


class FixedDraftLength:
    """Today's behaviour: always num_speculative_tokens."""

    def __init__(self, max_k: int) -> None:
        self.max_k = max_k

    def choose(self, num_decode: int, num_other_tokens: int = 0) -> int:
        return self.max_k

    def observe_acceptance(self, drafted: Sequence[tuple[int, int]]) -> None:
        pass

    def observe_verify(self, num_tokens: int, seconds: float) -> None:
        pass

    def observe_draft(
        self, num_steps: int, num_tokens: int, seconds: float, context_tokens: int = 0
    ) -> None:
        pass

    def observe_round(self, k: int, overhead_s: float) -> None:
        pass


# An observation above this many times the model's prediction is an outlier: left out, unless
# OUTLIER_RUN of them come in a row (then the costs changed, and they are fitted).
OUTLIER_FACTOR = 4.0
OUTLIER_RUN = 8


class OnlineLinear:
    """Exponentially weighted least squares y ~ x . theta, shrunk toward a prior theta, that
    leaves out isolated observations far above its prediction (``OUTLIER_FACTOR``).

    The prior enters as a ridge penalty ``weight * sum_j s_j^2 (theta_j - prior_j)^2`` with
    s_j the root mean square of feature j over the (weighted) observations, or over
    ``anchors`` before any: it is worth about ``weight`` observations per coefficient, at the
    scale the features actually take, so measurements override it where they vary.
    """

    def __init__(
        self,
        prior: Sequence[float],
        anchors: Sequence[Sequence[float]],
        *,
        weight: float,
        decay: float,
    ) -> None:
        n = len(prior)
        self.prior = np.asarray(prior, dtype=np.float64)
        xs = np.asarray(anchors, dtype=np.float64)  # [A, n]
        self._anchor_scale = (xs**2).mean(axis=0)  # [n]
        self.weight = weight
        self.decay = decay
        self._xtx = np.zeros((n, n))
        self._xty = np.zeros(n)
        self.num_observed = 0
        self.num_outliers = 0  # in a row
        self.theta = self.prior.copy()

    def observe(self, x: Sequence[float], y: float) -> None:
        # NOTE: a one-off stall (a kernel compiled on first use) can take hundreds of times a
        # step; fitted, or even capped, a few in a row would outweigh many real steps for long,
        # and a policy that then stops drafting measures the drafter too rarely to forget them.
        if y > OUTLIER_FACTOR * self.predict(x):
            self.num_outliers += 1
            if self.num_outliers < OUTLIER_RUN:
                return
        else:
            self.num_outliers = 0
        v = np.asarray(x, dtype=np.float64)
        self._xtx = self.decay * self._xtx + np.outer(v, v)
        self._xty = self.decay * self._xty + v * y
        self.num_observed += 1
        count = self._xtx[0, 0]  # NOTE: feature 0 is the constant 1
        scale = np.diag(self._xtx) / count if count > 0 else self._anchor_scale
        scale = np.where(scale > 0, scale, self._anchor_scale)
        penalty = self.weight * np.diag(scale)
        self.theta = np.linalg.solve(self._xtx + penalty, self._xty + penalty @ self.prior)

    def predict(self, x: Sequence[float]) -> float:
        """theta . x with negative slopes clipped (more work never predicts less time)."""
        th = self.theta.copy()
        th[1:] = np.maximum(th[1:], 0.0)
        return max(float(th @ np.asarray(x, dtype=np.float64)), 1e-9)


class AcceptanceEstimate:
    """Per-position conditional acceptance c_i, exponentially weighted, pulled to a prior."""

    def __init__(self, max_k: int, *, prior: float, weight: float, decay: float) -> None:
        self.prior = prior
        self.weight = weight
        self.decay = decay
        self.accepted = [0.0] * max_k
        self.reached = [0.0] * max_k

    def observe(self, drafted: Sequence[tuple[int, int]]) -> None:
        k = len(self.reached)
        reached = [0] * k
        accepted = [0] * k
        for n_draft, n_acc in drafted:
            for i in range(min(n_draft, n_acc + 1, k)):
                reached[i] += 1
            for i in range(min(n_acc, k)):
                accepted[i] += 1
        # NOTE: a position not drafted this round keeps its estimate (it is not forgotten).
        for i in range(k):
            if reached[i]:
                self.reached[i] = self.decay * self.reached[i] + reached[i]
                self.accepted[i] = self.decay * self.accepted[i] + accepted[i]

    def conditional(self) -> list[float]:
        w = self.weight
        return [
            (a + w * self.prior) / (r + w) for a, r in zip(self.accepted, self.reached, strict=True)
        ]

    def unconditional(self) -> list[float]:
        out, run = [], 1.0
        for c in self.conditional():
            run *= c
            out.append(run)
        return out


class GoodputDraftLength:
    def __init__(
        self, max_k: int, cfg: GoodputConfig, *, overlap: bool = False, concurrent: bool = True
    ) -> None:
        self.max_k = max_k
        self.cfg = cfg
        self.overlap = overlap
        self.concurrent = concurrent  # the driver runs an overlap's two calls at the same time
        self.acceptance = AcceptanceEstimate(
            max_k, prior=cfg.acceptance_prior, weight=cfg.prior_weight, decay=cfg.decay
        )
        self.verify_cost = OnlineLinear(
            (cfg.verify_base_s, cfg.verify_per_token_s),
            [(1.0, 1.0), (1.0, 128.0)],
            weight=cfg.prior_weight,
            decay=cfg.decay,
        )
        kmax = float(max(max_k, 2))
        self.draft_cost = OnlineLinear(
            (
                cfg.draft_base_s,
                cfg.draft_per_step_s,
                cfg.draft_per_token_s,
                cfg.draft_per_context_token_s,
            ),
            [
                (1.0, 1.0, 1.0, 1.0),
                (1.0, kmax, kmax, kmax),
                (1.0, kmax, 32.0 * kmax, 32.0 * kmax),
                (1.0, kmax, kmax, 128.0),
            ],
            weight=cfg.prior_weight,
            decay=cfg.decay,
        )
        # NOTE: per-round time outside the calls (bookkeeping, hidden rows, the round trip's
        # share the calls do not report): [plain rounds, drafting rounds], EWMA; it grows with
        # drafting, which the call models alone do not see.
        self.overhead_s = [0.0, 0.0]
        self._overhead_seen = [False, False]
        self.num_rounds = 0
        self.last = max_k
        self._probe = 0

    # -- the model ------------------------------------------------------------------------------
    def _draft_time(self, num_decode: int, k: int) -> float:
        # NOTE: in steady drafting each sequence ingests what the last round confirmed.
        context = num_decode * self.expected_tokens(k)
        return self.draft_cost.predict((1.0, float(k), float(num_decode * k), context))

    def expected_tokens(self, k: int) -> float:
        """Expected tokens one sequence gets from a round that drafts k."""
        return 1.0 + sum(self.acceptance.unconditional()[:k])

    def round_time(self, k: int, num_decode: int, num_other_tokens: int = 0) -> float:
        n = num_other_tokens + num_decode * (1 + k)
        t_verify = self.verify_cost.predict((1.0, float(n))) + self.overhead_s[int(k > 0)]
        if k == 0:
            return t_verify
        if not self.overlap:
            return t_verify + self._draft_time(num_decode, k)
        cond = self.acceptance.conditional()
        uncond = self.acceptance.unconditional()
        hit = uncond[k - 1] * cond[min(k, self.max_k - 1)]  # all k accepted, and the guess
        t_ahead = self._draft_time(num_decode, k + 1)
        th = self.draft_cost.theta
        d0, d1, d2 = float(th[0]), max(float(th[1]), 0.0), max(float(th[2]), 0.0)
        d0 += max(float(th[3]), 0.0) * num_decode * self.expected_tokens(k)
        miss_any = 1.0 - hit**num_decode
        t_cold = max(miss_any * (d0 + d1 * k) + d2 * k * num_decode * (1.0 - hit), 0.0)
        both = max(t_verify, t_ahead) if self.concurrent else t_verify + t_ahead
        return both + t_cold

    def goodput(self, k: int, num_decode: int, num_other_tokens: int = 0) -> float:
        tokens = num_decode * self.expected_tokens(k)
        return tokens / self.round_time(k, num_decode, num_other_tokens)

    def best(self, num_decode: int, num_other_tokens: int = 0) -> int:
        rates = [self.goodput(k, num_decode, num_other_tokens) for k in range(self.max_k + 1)]
        return int(np.argmax(rates))

    # -- the policy ------------------------------------------------------------------------------
    def choose(self, num_decode: int, num_other_tokens: int = 0) -> int:
        if num_decode == 0:
            return self.last
        self.num_rounds += 1
        k = self.best(num_decode, num_other_tokens)
        interval = self.cfg.probe_interval
        if interval and self.max_k > 0 and self.num_rounds % interval == 0:
            self._probe = (self._probe + 1) % (self.max_k + 1)
            if self._probe == k:
                self._probe = (self._probe + 1) % (self.max_k + 1)
            k = self._probe
        self.last = k
        return k

    def observe_acceptance(self, drafted: Sequence[tuple[int, int]]) -> None:
        self.acceptance.observe(drafted)

    def observe_verify(self, num_tokens: int, seconds: float) -> None:
        if num_tokens > 0 and seconds > 0:
            self.verify_cost.observe((1.0, float(num_tokens)), seconds)

    def observe_draft(
        self, num_steps: int, num_tokens: int, seconds: float, context_tokens: int = 0
    ) -> None:
        if num_steps > 0 and seconds > 0:
            x = (1.0, float(num_steps), float(num_tokens), float(context_tokens))
            self.draft_cost.observe(x, seconds)

    def observe_round(self, k: int, overhead_s: float) -> None:
        i = int(k > 0)
        if not self._overhead_seen[i]:
            self.overhead_s[i], self._overhead_seen[i] = overhead_s, True
            return
        # NOTE: capped at a few times the estimate, so one stall does not linger.
        seen = min(overhead_s, OUTLIER_FACTOR * max(self.overhead_s[i], 1e-4))
        self.overhead_s[i] = self.cfg.decay * self.overhead_s[i] + (1.0 - self.cfg.decay) * seen


def build_draft_length_policy(
    spec: SpeculativeConfig | None, *, concurrent: bool = True
) -> DraftLengthPolicy:
    """``concurrent``: the round's driver runs the two calls of an overlap at the same time."""
    k = (spec.num_speculative_tokens or 0) if spec is not None else 0
    if spec is None or spec.draft_length_policy == "fixed" or k == 0:
        return FixedDraftLength(k)
    return GoodputDraftLength(k, spec.goodput, overlap=spec.overlap, concurrent=concurrent)


def lookahead(spec: SpeculativeConfig | None) -> int:
    """KV positions a round may add beyond a sequence's tokens, in either group.

    k drafts + 1 output; with overlap the drafter also holds the guess of the bonus token and
    the next round's k drafts.
    """
    k = (spec.num_speculative_tokens or 0) if spec is not None else 0
    return 2 * k + 2 if spec is not None and spec.overlap and k else k + 1
