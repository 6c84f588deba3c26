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
# A steady batch size's best k is re-derived this often (rounds): the policy is on the round's
# critical path, and its inputs move slowly (exponentially weighted).
REUSE_ROUNDS = 8


class OnlineLinear:
    """Exponentially weighted least squares y ~ x . theta, shrunk toward a prior theta, that
    leaves out isolated observations far above its prediction (``OUTLIER_FACTOR``).

    The prior enters as a ridge penalty ``weight * sum_j s_j^2 (theta_j - prior_j)^2`` with
    s_j the root mean square of feature j over the (weighted) observations, or over
    ``anchors`` before any: it is worth about ``weight`` observations per coefficient, at the
    scale the features actually take, so measurements override it where they vary.

    Plain Python on a few features: the policy runs on the round's critical path. Observations
    only accumulate; the solve runs when ``predict`` first needs it (once per round).
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
        self.prior = [float(p) for p in prior]
        self._anchor_scale = [
            sum(float(a[j]) ** 2 for a in anchors) / len(anchors) for j in range(n)
        ]
        self.weight = weight
        self.decay = decay
        self._xtx = [[0.0] * n for _ in range(n)]
        self._xty = [0.0] * n
        self.num_observed = 0
        self.num_outliers = 0  # in a row
        self.theta = list(self.prior)
        self._clipped = self._clip(self.theta)
        self._dirty = False

    @staticmethod
    def _clip(theta: list[float]) -> list[float]:
        return [theta[0], *(max(t, 0.0) for t in theta[1:])]

    def observe(self, x: Sequence[float], y: float) -> None:
        # NOTE: a one-off stall (a kernel compiled on first use) can take hundreds of times a
        # step; fitted, or even capped, a few in a row would outweigh many real steps for long,
        # and a policy that then stops drafting measures the drafter too rarely to forget them.
        # The check uses the fit as of the last prediction.
        if y > OUTLIER_FACTOR * self._dot(x):
            self.num_outliers += 1
            if self.num_outliers < OUTLIER_RUN:
                return
        else:
            self.num_outliers = 0
        d = self.decay
        v = [float(e) for e in x]
        for i, row in enumerate(self._xtx):
            vi = v[i]
            for j, vj in enumerate(v):
                row[j] = d * row[j] + vi * vj
            self._xty[i] = d * self._xty[i] + vi * y
        self.num_observed += 1
        self._dirty = True

    def _refit(self) -> None:
        n = len(self.prior)
        count = self._xtx[0][0]  # NOTE: feature 0 is the constant 1
        a = [row[:] for row in self._xtx]
        b = self._xty[:]
        for j in range(n):
            s = self._xtx[j][j] / count if count > 0 else 0.0
            p = self.weight * (s if s > 0 else self._anchor_scale[j])
            a[j][j] += p
            b[j] += p * self.prior[j]
        self.theta = _solve(a, b)
        self._clipped = self._clip(self.theta)
        self._dirty = False

    def _dot(self, x: Sequence[float]) -> float:
        return max(sum(t * float(e) for t, e in zip(self._clipped, x, strict=True)), 1e-9)

    def predict(self, x: Sequence[float]) -> float:
        """theta . x with negative slopes clipped (more work never predicts less time)."""
        if self._dirty:
            self._refit()
        return self._dot(x)

    def coefficients(self) -> list[float]:
        """theta, slopes clipped at 0, as used by ``predict``."""
        if self._dirty:
            self._refit()
        return list(self._clipped)


def _solve(a: list[list[float]], b: list[float]) -> list[float]:
    """a x = b for a small symmetric positive definite a (Gaussian elimination, pivoting)."""
    n = len(b)
    m = [[*row, bi] for row, bi in zip(a, b, strict=True)]
    for c in range(n):
        p = max(range(c, n), key=lambda r: abs(m[r][c]))
        m[c], m[p] = m[p], m[c]
        piv = m[c][c]
        if piv == 0.0:
            continue
        for r in range(c + 1, n):
            f = m[r][c] / piv
            if f:
                for j in range(c, n + 1):
                    m[r][j] -= f * m[c][j]
    x = [0.0] * n
    for c in range(n - 1, -1, -1):
        acc = m[c][n] - sum(m[c][j] * x[j] for j in range(c + 1, n))
        x[c] = acc / m[c][c] if m[c][c] else 0.0
    return x


def _running_product(xs: list[float]) -> list[float]:
    out, run = [], 1.0
    for x in xs:
        run *= x
        out.append(run)
    return out


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
        return _running_product(self.conditional())


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
        self._cached: dict[int, tuple[int, int]] = {}  # batch size -> (k, round chosen)

    # -- the model ------------------------------------------------------------------------------
    def _draft_time(self, num_decode: int, k: int, expected: float | None = None) -> float:
        # NOTE: in steady drafting each sequence ingests what the last round confirmed.
        context = num_decode * (self.expected_tokens(k) if expected is None else expected)
        return self.draft_cost.predict((1.0, float(k), float(num_decode * k), context))

    def expected_tokens(self, k: int) -> float:
        """Expected tokens one sequence gets from a round that drafts k."""
        return 1.0 + sum(self.acceptance.unconditional()[:k])

    def round_time(self, k: int, num_decode: int, num_other_tokens: int = 0) -> float:
        cond = self.acceptance.conditional()
        return self._round_time(k, num_decode, num_other_tokens, cond, _running_product(cond))

    def _round_time(
        self,
        k: int,
        num_decode: int,
        num_other_tokens: int,
        cond: list[float],
        uncond: list[float],
    ) -> float:
        n = num_other_tokens + num_decode * (1 + k)
        t_verify = self.verify_cost.predict((1.0, float(n))) + self.overhead_s[int(k > 0)]
        if k == 0:
            return t_verify
        expected = 1.0 + sum(uncond[:k])
        if not self.overlap:
            return t_verify + self._draft_time(num_decode, k, expected)
        hit = uncond[k - 1] * cond[min(k, self.max_k - 1)]  # all k accepted, and the guess
        t_ahead = self._draft_time(num_decode, k + 1, 1.0 + sum(uncond[: k + 1]))
        d0, d1, d2, d3 = self.draft_cost.coefficients()
        d0 += d3 * num_decode * expected
        miss_any = 1.0 - hit**num_decode
        t_cold = max(miss_any * (d0 + d1 * k) + d2 * k * num_decode * (1.0 - hit), 0.0)
        both = max(t_verify, t_ahead) if self.concurrent else t_verify + t_ahead
        return both + t_cold

    def goodput(self, k: int, num_decode: int, num_other_tokens: int = 0) -> float:
        tokens = num_decode * self.expected_tokens(k)
        return tokens / self.round_time(k, num_decode, num_other_tokens)

    def best(self, num_decode: int, num_other_tokens: int = 0) -> int:
        cond = self.acceptance.conditional()
        uncond = _running_product(cond)
        best_k, best_rate, tokens = 0, -1.0, 1.0
        for k in range(self.max_k + 1):
            if k:
                tokens += uncond[k - 1]
            rate = tokens / self._round_time(k, num_decode, num_other_tokens, cond, uncond)
            if rate > best_rate:
                best_k, best_rate = k, rate
        return best_k

    # -- the policy ------------------------------------------------------------------------------
    def choose(self, num_decode: int, num_other_tokens: int = 0) -> int:
        if num_decode == 0:
            return self.last
        self.num_rounds += 1
        k = self._steady_best(num_decode) if num_other_tokens == 0 else -1
        if k < 0:
            k = self.best(num_decode, num_other_tokens)
        interval = self.cfg.probe_interval
        if interval and self.max_k > 0 and self.num_rounds % interval == 0:
            self._probe = (self._probe + 1) % (self.max_k + 1)
            if self._probe == k:
                self._probe = (self._probe + 1) % (self.max_k + 1)
            k = self._probe
        self.last = k
        return k

    def _steady_best(self, num_decode: int) -> int:
        """``best`` for a round without prefills, re-derived every ``REUSE_ROUNDS`` rounds."""
        hit = self._cached.get(num_decode)
        if hit is not None and self.num_rounds - hit[1] < REUSE_ROUNDS:
            return hit[0]
        k = self.best(num_decode)
        self._cached[num_decode] = (k, self.num_rounds)
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
