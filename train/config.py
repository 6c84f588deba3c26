"""TrainConfig: one typed structure for a `outrider train-drafter` run.

The same struct is written into every checkpoint so that a resumed run can refuse settings that
differ from the ones it started with.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from outrider.workers.config import ConfigError

Method = Literal["eagle3", "peagle", "dflash"]
METHODS: tuple[str, ...] = ("eagle3", "peagle", "dflash")


class DataConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    # NOTE: Magpie-style prompts written by the target itself, one per (topic, sample).
    num_prompts: int = 256
    prompt_files: list[str] = []  # jsonl with {"prompt": str} or {"messages": [...]}
    topics: list[str] = []  # empty = the built-in training topic list
    max_prompt_tokens: int = 96
    max_new_tokens: int = 384
    # NOTE: the fraction of responses decoded greedily; the rest at `temperature`.
    greedy_fraction: float = 0.5
    temperature: float = 0.8
    max_num_seqs: int = 64
    seed: int = 0
    # NOTE: answering stops after this many seconds (the prompts answered so far are kept).
    max_seconds: float | None = None

    def validate(self) -> None:
        if self.max_seconds is not None and not self.max_seconds > 0:
            raise ConfigError(f"`data.max_seconds` must be > 0, got {self.max_seconds}")
        if self.num_prompts < 0:
            raise ConfigError(f"`data.num_prompts` must be >= 0, got {self.num_prompts}")
        for name in ("max_prompt_tokens", "max_new_tokens", "max_num_seqs"):
            value = getattr(self, name)
            if value <= 0:
                raise ConfigError(f"`data.{name}` must be > 0, got {value}")
        if not 0.0 <= self.greedy_fraction <= 1.0:
            raise ConfigError(
                f"`data.greedy_fraction` must be in [0, 1], got {self.greedy_fraction}"
            )
        if not self.temperature > 0.0:
            raise ConfigError(f"`data.temperature` must be > 0, got {self.temperature}")


class ModelShape(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """The draft network; None fields copy the target's value."""

    num_layers: int | None = None  # None: 1 for eagle3/peagle, 2 for dflash
    intermediate_size: int | None = None
    draft_vocab_size: int = 8192
    num_speculative_tokens: int = 4  # eagle3: TTT steps; peagle: depths; dflash: block - 1
    aux_layer_ids: list[int] = []  # empty: (2, N // 2, N - 3)

    def validate(self) -> None:
        if self.num_layers is not None and self.num_layers < 1:
            raise ConfigError(f"`model.num_layers` must be >= 1, got {self.num_layers}")
        if self.intermediate_size is not None and self.intermediate_size < 1:
            raise ConfigError(
                f"`model.intermediate_size` must be >= 1, got {self.intermediate_size}"
            )
        if self.draft_vocab_size < 2:
            raise ConfigError(f"`model.draft_vocab_size` must be >= 2, got {self.draft_vocab_size}")
        if not 1 <= self.num_speculative_tokens <= 16:
            raise ConfigError(
                "`model.num_speculative_tokens` must be in [1, 16], "
                f"got {self.num_speculative_tokens}"
            )


class OptimConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    steps: int = 2000
    lr: float = 1e-3
    warmup_steps: int = 100
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    batch_size: int = 8  # sequences per step
    max_seq_len: int = 512
    # NOTE: EAGLE-3 weighs draft step s by decay**s, as the EAGLE papers do.
    step_decay: float = 0.8
    dflash_anchors: int = 64  # anchors per sequence per step
    checkpoint_every: int = 200
    seed: int = 0
    # NOTE: training stops (checkpointed and exported) after this many seconds of this run.
    max_seconds: float | None = None

    def validate(self) -> None:
        if self.max_seconds is not None and not self.max_seconds > 0:
            raise ConfigError(f"`optim.max_seconds` must be > 0, got {self.max_seconds}")
        for name in ("steps", "batch_size", "max_seq_len", "checkpoint_every", "dflash_anchors"):
            value = getattr(self, name)
            if value <= 0:
                raise ConfigError(f"`optim.{name}` must be > 0, got {value}")
        if not self.lr > 0:
            raise ConfigError(f"`optim.lr` must be > 0, got {self.lr}")
        if self.warmup_steps < 0:
            raise ConfigError(f"`optim.warmup_steps` must be >= 0, got {self.warmup_steps}")
        if not 0.0 < self.step_decay <= 1.0:
            raise ConfigError(f"`optim.step_decay` must be in (0, 1], got {self.step_decay}")


class TrainConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    method: Method
    out: str
    target: str | None = None  # None: the embedded SmolLM2-135M-Instruct
    target_name: str | None = None  # verifier.name_or_path written into the checkpoint
    data_dir: str | None = None  # None: <out>/data (shared between methods when given)
    device: str = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float64"] = "auto"
    data: DataConfig = DataConfig()
    model: ModelShape = ModelShape()
    optim: OptimConfig = OptimConfig()
    eval_prompts: int = 32
    eval_max_tokens: int = 128

    def validate(self) -> TrainConfig:
        if self.method not in METHODS:
            raise ConfigError(f"`method` must be one of {', '.join(METHODS)}, got {self.method!r}")
        if not self.out:
            raise ConfigError("`out` must name the output directory")
        if self.eval_prompts < 0:
            raise ConfigError(f"`eval_prompts` must be >= 0, got {self.eval_prompts}")
        if self.eval_max_tokens <= 0:
            raise ConfigError(f"`eval_max_tokens` must be > 0, got {self.eval_max_tokens}")
        self.data.validate()
        self.model.validate()
        self.optim.validate()
        return self

    @property
    def num_layers(self) -> int:
        if self.model.num_layers is not None:
            return self.model.num_layers
        return 2 if self.method == "dflash" else 1
