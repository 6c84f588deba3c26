"""SpeculativeConfig: vLLM's ``--speculative-config`` keys plus the drafter group's own layout.

Key names mirror vLLM (``method``, ``model``, ``num_speculative_tokens``, ``parallel_drafting``,
``moe_backend``, ``attention_backend``, ``quantization``, ``dtype``, ``prompt_lookup_min``,
``prompt_lookup_max``, ``draft_tensor_parallel_size``). Unlike vLLM, the drafter has its own
tensor and pipeline parallel sizes and its own device pool.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from outrider.workers.config import (
    AttentionBackendName,
    CacheConfig,
    ConfigError,
    Dtype,
    MoeBackendName,
    PoolConfig,
    Quantization,
)
from outrider.workers.synthetic import check_rates, rates_from_length

Method = Literal["ngram", "draft_model", "eagle3", "peagle", "dflash"]
# NOTE: "synthetic" (benchmarks only) is never a default: it must be set explicitly.
VerificationMode = Literal["strict", "probabilistic", "synthetic"]

NGRAM_DEFAULT_LOOKUP = 5


class GoodputConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Priors and memory of ``draft_length_policy: goodput`` (cluster/draft_length.py)."""

    # Target call: verify_base_s + verify_per_token_s * (query tokens in the batch).
    verify_base_s: float = 0.01
    verify_per_token_s: float = 5e-5
    # Drafter call: draft_base_s + draft_per_step_s * k + draft_per_token_s * (k * batch)
    # + draft_per_context_token_s * (confirmed tokens the call ingests over the batch).
    draft_base_s: float = 0.001
    draft_per_step_s: float = 0.001
    draft_per_token_s: float = 1e-5
    draft_per_context_token_s: float = 2e-5
    # Conditional acceptance per draft position before any is measured.
    acceptance_prior: float = 0.6
    # How many observations the priors are worth, and the forgetting factor per observation.
    prior_weight: float = 4.0
    decay: float = 0.98
    # Every this many rounds try another k so the model stays measured; 0 = never.
    probe_interval: int = 64

    def validate(self, where: str = "speculative.goodput") -> None:
        for name in (
            "verify_base_s",
            "verify_per_token_s",
            "draft_base_s",
            "draft_per_step_s",
            "draft_per_token_s",
            "draft_per_context_token_s",
        ):
            value = getattr(self, name)
            if not value >= 0.0:
                raise ConfigError(f"`{where}.{name}` must be >= 0, got {value}")
        if not 0.0 <= self.acceptance_prior <= 1.0:
            raise ConfigError(
                f"`{where}.acceptance_prior` must be in [0, 1], got {self.acceptance_prior}"
            )
        if not self.prior_weight > 0.0:
            raise ConfigError(f"`{where}.prior_weight` must be > 0, got {self.prior_weight}")
        if not 0.0 < self.decay <= 1.0:
            raise ConfigError(f"`{where}.decay` must be in (0, 1], got {self.decay}")
        if self.probe_interval < 0:
            raise ConfigError(f"`{where}.probe_interval` must be >= 0, got {self.probe_interval}")


class SpeculativeConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    # NOTE: method None with a speculators-format `model` takes the method from the checkpoint.
    method: Method | None = None
    model: str | None = None
    num_speculative_tokens: int | None = None
    parallel_drafting: bool | None = None
    # NOTE: None = inherit the target's moe_backend; "auto" = the drafter's own selection.
    moe_backend: MoeBackendName | None = None
    # NOTE: None = selected independently for the drafter (not inherited), as in vLLM.
    attention_backend: AttentionBackendName | None = None
    quantization: Quantization | None = None
    dtype: Dtype | None = None
    prompt_lookup_min: int | None = None
    prompt_lookup_max: int | None = None
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    draft_tensor_parallel_size: int | None = None
    verification: VerificationMode = "probabilistic"
    # With verification "synthetic" (vLLM's names): unconditional acceptance per draft position,
    # or a mean acceptance length resolved to such rates. Exactly one of the two.
    synthetic_acceptance_rates: tuple[float, ...] | None = None
    synthetic_acceptance_length: float | None = None
    # Draft by sampling from the drafter (and send its probabilities) instead of by argmax.
    draft_sampling: bool = False
    # fixed: always num_speculative_tokens; goodput: k in [0, num_speculative_tokens] per round
    # from the batch size, measured acceptance and round costs (0 = plain decoding).
    draft_length_policy: Literal["fixed", "goodput"] = "fixed"
    goodput: GoodputConfig = GoodputConfig()
    # Draft round r + 1 while the target verifies round r (drafters without target hidden states).
    overlap: bool = False
    max_model_len: int | None = None
    cache: CacheConfig = CacheConfig()
    pool: PoolConfig = PoolConfig()
    device: str = "auto"

    def validate(self, where: str = "speculative") -> None:
        k = self.num_speculative_tokens
        if k is not None and not 1 <= k <= 32:
            raise ConfigError(f"`{where}.num_speculative_tokens` must be in [1, 32], got {k}")
        if self.method is None and self.model is None:
            raise ConfigError(f"`{where}`: set `method` or a speculators-format `model`")
        if self.method in ("draft_model", "eagle3", "peagle", "dflash") and self.model is None:
            raise ConfigError(f"`{where}.model` is required for method {self.method!r}")
        if self.method == "dflash" and self.parallel_drafting is False:
            raise ConfigError(f"`{where}.parallel_drafting` cannot be false for dflash")
        lo, hi = self.prompt_lookup_min, self.prompt_lookup_max
        for name, value in (("prompt_lookup_min", lo), ("prompt_lookup_max", hi)):
            if value is not None and value < 1:
                raise ConfigError(f"`{where}.{name}` must be >= 1, got {value}")
        if lo is not None and hi is not None and lo > hi:
            raise ConfigError(
                f"`{where}.prompt_lookup_min` must be <= prompt_lookup_max, got {lo} > {hi}"
            )
        for name in ("tensor_parallel_size", "pipeline_parallel_size"):
            value = getattr(self, name)
            if value < 1:
                raise ConfigError(f"`{where}.{name}` must be >= 1, got {value}")
        self.synthetic_rates(where, resolved=False)
        self.goodput.validate(f"{where}.goodput")
        self.cache.validate(f"{where}.cache")
        self.pool.validate(f"{where}.pool")

    def synthetic_rates(
        self, where: str = "speculative", *, resolved: bool = True
    ) -> tuple[float, ...] | None:
        """The synthetic acceptance rates (None unless verification is synthetic).

        ``resolved``: num_speculative_tokens is final (a checkpoint may still set it before).
        """
        rates, length = self.synthetic_acceptance_rates, self.synthetic_acceptance_length
        if self.verification != "synthetic":
            for name, value in (
                ("synthetic_acceptance_rates", rates),
                ("synthetic_acceptance_length", length),
            ):
                if value is not None:
                    raise ConfigError(
                        f"`{where}.{name}` applies only with `{where}.verification: synthetic`, "
                        f"got verification {self.verification!r}"
                    )
            return None
        if (rates is None) == (length is None):
            raise ConfigError(
                f"`{where}.verification: synthetic` needs exactly one of "
                f"`{where}.synthetic_acceptance_rates` or `{where}.synthetic_acceptance_length`"
            )
        k = self.num_speculative_tokens
        if k is None and not resolved:
            return None
        if k is None:
            raise ConfigError(
                f"`{where}.verification: synthetic` needs `{where}.num_speculative_tokens`"
            )
        if length is not None:
            if not 1.0 <= length <= k + 1:
                raise ConfigError(
                    f"`{where}.synthetic_acceptance_length` must be in [1, {k + 1}], got {length}"
                )
            return rates_from_length(length, k)
        assert rates is not None
        try:
            check_rates(rates, k, f"{where}.synthetic_acceptance_rates")
        except ValueError as e:
            raise ConfigError(str(e)) from None
        return tuple(float(r) for r in rates)

    @property
    def lookup_min(self) -> int:
        return self.prompt_lookup_min or min(
            NGRAM_DEFAULT_LOOKUP, self.prompt_lookup_max or NGRAM_DEFAULT_LOOKUP
        )

    @property
    def lookup_max(self) -> int:
        return self.prompt_lookup_max or max(NGRAM_DEFAULT_LOOKUP, self.lookup_min)
