"""Build the drafter named by a SpeculativeConfig, after resolving checkpoint-given settings."""

from __future__ import annotations

import msgspec

from outrider.workers.config import ConfigError, WorkerConfig
from outrider.workers.proposers.base import Proposer
from outrider.workers.spec_config import SpeculativeConfig


def resolve_speculative(
    spec: SpeculativeConfig | None, target: WorkerConfig
) -> SpeculativeConfig | None:
    """Fill method, k and parallel_drafting from the method's defaults (and checkpoint)."""
    if spec is None:
        return None
    method = spec.method
    if method is None:
        raise ConfigError("`speculative.method` is required")
    k = spec.num_speculative_tokens
    if k is None:
        raise ConfigError(f"`speculative.num_speculative_tokens` is required for {method}")
    parallel = spec.parallel_drafting
    if parallel is None:
        parallel = method in ("ngram", "peagle", "dflash")
    return msgspec.structs.replace(
        spec, method=method, num_speculative_tokens=k, parallel_drafting=parallel
    )


def build_drafter(
    spec: SpeculativeConfig, target: WorkerConfig, *, target_runner: object | None = None
) -> Proposer:
    if spec.method == "ngram":
        from outrider.workers.proposers.ngram import NgramProposer

        return NgramProposer(spec)
    raise ConfigError(f"speculative method {spec.method!r} is not available yet")
