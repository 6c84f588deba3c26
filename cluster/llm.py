"""In-process Python API: ``LLM(config).generate(prompts, params)``.

Target and drafter live in this process and the round loop calls them directly. It is what
``outrider generate`` runs, and the reference the served path is checked against.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from outrider.cluster.async_engine import AsyncEngine
from outrider.cluster.config import OutriderConfig
from outrider.cluster.detokenizer import Detokenizer
from outrider.cluster.draft_length import build_draft_length_policy, lookahead
from outrider.cluster.engine import Call, EngineCore
from outrider.cluster.scheduler import KVBudget, Scheduler
from outrider.cluster.sequence import SpecStats
from outrider.workers.config import ConfigError, SamplingParams
from outrider.workers.models.loader import has_tokenizer, load_tokenizer
from outrider.workers.proposers.factory import build_drafter, resolve_speculative
from outrider.workers.runner import ModelBuilder, ModelRunner
from outrider.workers.verifier import Verifier

EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"


@dataclass
class RequestOutput:
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
    spec: SpecStats = field(default_factory=SpecStats)

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)


def default_model_name(config: OutriderConfig) -> str:
    path = config.target.model.path
    if path is None:
        return EMBEDDED_MODEL_NAME
    return Path(path).name.removesuffix(".gguf") or str(path)


def eos_token_ids(tokenizer: Any, hf_config: Any) -> set[int]:
    ids: set[int] = set()
    tok_eos = tokenizer.eos_token_id if tokenizer is not None else None
    for src in (getattr(hf_config, "eos_token_id", None), tok_eos):
        if isinstance(src, int):
            ids.add(src)
        elif isinstance(src, (list, tuple)):
            ids.update(int(i) for i in src)
    return ids


class LLM:
    def __init__(
        self, config: OutriderConfig | None = None, *, target_build: ModelBuilder | None = None
    ) -> None:
        """``target_build`` replaces the target's loader (``ModelRunner(build=...)``), e.g.
        random weights at a real shape for benchmarks; ``target.model.path`` still names the
        tokenizer (a folder with none gives a token-ids-only LLM)."""
        self.config = config = (config or OutriderConfig()).validate()
        self.runner = ModelRunner(config.target, group="target", build=target_build)
        # NOTE: a model without a tokenizer (tiny test models) takes token ids and returns no text.
        self.tokenizer = (
            load_tokenizer(config.target.model) if has_tokenizer(config.target.model) else None
        )
        self.spec = resolve_speculative(config.speculative, config.target)
        self.drafter = (
            build_drafter(
                self.spec,
                config.target,
                target_vocab_size=self.runner.hf_config.vocab_size,
                target_num_layers=self.runner.hf_config.num_hidden_layers,
                target_moe_backend=self.runner.moe_backend,
            )
            if self.spec is not None
            else None
        )
        caps = self.drafter.capabilities if self.drafter is not None else None
        k = (self.spec.num_speculative_tokens or 0) if self.spec is not None else 0
        self.verifier = Verifier(
            self.runner,
            verification=self.spec.verification if self.spec is not None else "probabilistic",
            aux_layer_ids=caps.aux_layer_ids if caps is not None else (),
            synthetic_rates=self.spec.synthetic_rates() if self.spec is not None else None,
            num_speculative_tokens=k,
        )
        self.max_model_len = self.runner.max_model_len
        budgets = [KVBudget(self.runner.num_blocks, self.runner.block_size)]
        if self.drafter is not None:
            budgets.extend(
                KVBudget(u["num_blocks"], u["block_size"]) for u in [self.drafter.kv_usage()] if u
            )
        self.scheduler = Scheduler(
            budgets,
            max_num_seqs=config.scheduler.max_num_seqs,
            max_num_batched_tokens=config.scheduler.max_num_batched_tokens,
            lookahead=lookahead(self.spec),
        )
        detok = Detokenizer(
            self.tokenizer,
            eos_token_ids(self.tokenizer, self.runner.hf_config),
            self.max_model_len,
        )
        self.engine = EngineCore(
            self.verifier,
            detok,
            self.scheduler,
            drafter=self.drafter,
            num_speculative_tokens=k,
            max_model_len=self.max_model_len,
            synthetic=self.spec is not None and self.spec.verification == "synthetic",
            draft_length=build_draft_length_policy(self.spec, concurrent=False),
            overlap=self.spec is not None and self.spec.overlap,
        )

    # -- prompts ----------------------------------------------------------------------------
    def encode(self, prompt: str, *, chat: bool = False) -> list[int]:
        if self.tokenizer is None:
            raise ConfigError("this model has no tokenizer: give the prompt as token ids")
        if chat:
            ids = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}],
                add_generation_prompt=True,
                tokenize=True,
            )
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
            return [int(i) for i in ids]
        return [int(i) for i in self.tokenizer.encode(prompt)]

    def check_prompt(self, prompt_token_ids: Sequence[int], params: SamplingParams) -> None:
        n = len(prompt_token_ids)
        if n == 0:
            raise ConfigError("the prompt is empty")
        if n >= self.max_model_len:
            raise ConfigError(
                f"the prompt has {n} tokens, which does not fit max_model_len "
                f"{self.max_model_len} with room for one generated token"
            )
        if not self.scheduler.fits_alone(n + 1):
            raise ConfigError(f"the prompt has {n} tokens, more than the KV cache can hold")
        vocab = self.runner.hf_config.vocab_size
        bad = [t for t in prompt_token_ids if not 0 <= t < vocab]
        if bad:
            raise ConfigError(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab})")

    # -- generation -------------------------------------------------------------------------
    def generate(
        self,
        prompts: Sequence[str] | Sequence[list[int]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        chat: bool = False,
    ) -> list[RequestOutput]:
        if isinstance(params, Sequence):
            plist = list(params)
        else:
            plist = [params or SamplingParams()] * len(prompts)
        if len(plist) != len(prompts):
            raise ConfigError(f"got {len(prompts)} prompts but {len(plist)} sampling params")
        seqs = []
        for prompt, p in zip(prompts, plist, strict=True):
            p.validate()
            if p.stop and self.tokenizer is None:
                raise ConfigError("`stop` strings need a tokenizer; this model has none")
            ids = self.encode(prompt, chat=chat) if isinstance(prompt, str) else list(prompt)
            self.check_prompt(ids, p)
            seqs.append(self.engine.add_request(ids, p))
        while self.engine.has_unfinished():
            self.engine.step()
        return [
            RequestOutput(
                s.prompt_token_ids, s.output_token_ids, s.text, s.finish_reason or "length", s.stats
            )
            for s in seqs
        ]

    def async_engine(self, **kwargs: Any) -> AsyncEngine:
        """An AsyncEngine over this process's workers (calls run in a worker thread)."""
        core = self.engine

        async def call(c: Call) -> Any:
            return await asyncio.to_thread(core._call, c)

        def kv_usage() -> float:
            return self.runner.kv.num_used_blocks / max(self.runner.num_blocks, 1)

        name = kwargs.pop("model_name", None) or self.model_name
        return AsyncEngine(core, call, model_name=name, kv_usage=kv_usage, **kwargs)

    @property
    def model_name(self) -> str:
        return self.config.server.served_model_name or default_model_name(self.config)

    def timed_generate(self, *args: Any, **kwargs: Any) -> tuple[list[RequestOutput], float]:
        t0 = time.perf_counter()
        out = self.generate(*args, **kwargs)
        return out, time.perf_counter() - t0
