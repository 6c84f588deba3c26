"""Resolve a SpeculativeConfig (checkpoint-given settings, inheritance) and build its drafter."""

from __future__ import annotations

import msgspec

from outrider.workers.config import (
    ConfigError,
    KernelConfig,
    ModelConfig,
    ParallelConfig,
    WorkerConfig,
)
from outrider.workers.proposers.base import Proposer
from outrider.workers.spec_config import SpeculativeConfig
from outrider.workers.speculators import is_speculators_dir, load_speculators_config

MODEL_FREE_METHODS = ("ngram",)


def resolve_speculative(
    spec: SpeculativeConfig | None, target: WorkerConfig | None = None
) -> SpeculativeConfig | None:
    """Fill method, k and parallel_drafting from the checkpoint and the method's defaults.

    A speculators-format ``model`` sets the method (peagle -> eagle3 + parallel drafting) and
    ``num_speculative_tokens``; explicit config values win where vLLM lets them.
    """
    if spec is None:
        return None
    method = spec.method
    k = spec.num_speculative_tokens
    parallel = spec.parallel_drafting
    if spec.model is not None and is_speculators_dir(spec.model):
        ckpt = load_speculators_config(spec.model)
        if method not in (None, ckpt.method, ckpt.model_type):
            raise ConfigError(
                f"`speculative.method` {method!r} does not match the speculators checkpoint "
                f"at {spec.model}, whose speculators_model_type is {ckpt.model_type!r}"
            )
        method = ckpt.method
        k = k if k is not None else ckpt.num_speculative_tokens
        if parallel is None:
            parallel = ckpt.parallel_drafting
    if method is None:
        raise ConfigError(
            "`speculative.method` is required unless `speculative.model` is a "
            "speculators-format checkpoint"
        )
    if method == "peagle":
        method, parallel = "eagle3", True if parallel is None else parallel
    if k is None:
        raise ConfigError(f"`speculative.num_speculative_tokens` is required for {method}")
    if method == "dflash":
        if parallel is False:
            raise ConfigError("`speculative.parallel_drafting` cannot be false for dflash")
        parallel = True
    if parallel is None:
        parallel = method in MODEL_FREE_METHODS
    return msgspec.structs.replace(
        spec, method=method, num_speculative_tokens=k, parallel_drafting=parallel
    )


def drafter_moe_backend(requested: str | None, target_moe_backend: str | None) -> str | None:
    """vLLM #37880: unset inherits the target's; a value (``auto`` included) is the drafter's."""
    return target_moe_backend if requested is None else requested


def drafter_worker_config(
    spec: SpeculativeConfig, target: WorkerConfig, *, target_moe_backend: str | None = None
) -> WorkerConfig:
    if spec.model is None:
        raise ConfigError(f"`speculative.model` is required for method {spec.method!r}")
    inherited = target_moe_backend if target_moe_backend is not None else target.kernels.moe_backend
    return WorkerConfig(
        model=ModelConfig(
            path=spec.model,
            dtype=spec.dtype or target.model.dtype,
            max_model_len=spec.max_model_len or target.model.max_model_len,
            quantization=spec.quantization or "none",
        ),
        parallel=ParallelConfig(
            tensor_parallel_size=spec.draft_tensor_parallel_size or spec.tensor_parallel_size,
            pipeline_parallel_size=spec.pipeline_parallel_size,
        ),
        kernels=KernelConfig(
            attention_backend=spec.attention_backend or "auto",
            moe_backend=drafter_moe_backend(spec.moe_backend, inherited),  # type: ignore[arg-type]
        ),
        cache=spec.cache,
        device=spec.device,
    )


def build_drafter(
    spec: SpeculativeConfig,
    target: WorkerConfig,
    *,
    target_vocab_size: int,
    target_num_layers: int,
    target_moe_backend: str | None = None,
    start_layer: int = 0,
    end_layer: int | None = None,
) -> Proposer:
    """Build the drafter of one worker (its pipeline stage ``start_layer:end_layer``)."""
    if spec.method == "ngram":
        from outrider.workers.proposers.ngram import NgramProposer

        return NgramProposer(spec)
    from outrider.workers.runner import ModelRunner

    wcfg = drafter_worker_config(spec, target, target_moe_backend=target_moe_backend)
    if spec.method == "draft_model":
        from outrider.workers.proposers.draft_model import DraftModelProposer

        runner = ModelRunner(wcfg, group="drafter", start_layer=start_layer, end_layer=end_layer)
        return DraftModelProposer(spec, runner, target_vocab_size=target_vocab_size)
    if spec.method == "eagle3":
        from outrider.workers.proposers.eagle3 import Eagle3Proposer

        return Eagle3Proposer(
            spec,
            wcfg,
            target_vocab_size=target_vocab_size,
            target_num_layers=target_num_layers,
            target_model=target.model,
        )
    if spec.method == "dflash":
        from outrider.workers.proposers.dflash import DFlashProposer

        return DFlashProposer(
            spec,
            wcfg,
            target_vocab_size=target_vocab_size,
            target_num_layers=target_num_layers,
            target_model=target.model,
        )
    raise ConfigError(f"unknown speculative method {spec.method!r}")
