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
