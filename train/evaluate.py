"""Held-out evaluation of a drafter on outrider's engine: acceptance and speed, on vs off.

Prompts come from the target itself (Magpie) over HELDOUT_TOPICS with another seed than the
training data, or from a jsonl file. Decoding is greedy with ``num_speculative_tokens`` drafts;
every output must equal plain decoding token for token (the run fails otherwise).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from outrider.cluster.config import OutriderConfig, SchedulerConfig
from outrider.cluster.llm import LLM
from outrider.cluster.sequence import SpecStats
from outrider.workers.config import (
    CacheConfig,
    ConfigError,
    ModelConfig,
    SamplingParams,
    WorkerConfig,
)
from outrider.workers.spec_config import SpeculativeConfig


@dataclass
class EvalReport:
    method: str
    num_prompts: int
    max_tokens: int
    num_speculative_tokens: int
    batch_size: int
    acceptance_length: float
    per_position: list[float]
    tokens_per_s_spec: float
    tokens_per_s_plain: float
    speedup: float
    lossless: bool
    device: str
    prompt_source: str
    dtype: str = ""
    num_identical: int = 0  # outputs equal to plain decoding, of num_prompts

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def eval_config(
    target: str | None,
    device: str,
    drafter: str | None,
    k: int,
    max_num_seqs: int,
    *,
    parallel_drafting: bool | None = None,
    dtype: str = "auto",
) -> OutriderConfig:
    worker = WorkerConfig(
        model=ModelConfig(path=target, dtype=dtype),  # type: ignore[arg-type]
        cache=CacheConfig(num_blocks=2048),
        device=device,
    )
    spec = None
    if drafter is not None:
        spec = SpeculativeConfig(
            model=drafter,
            num_speculative_tokens=k,
            parallel_drafting=parallel_drafting,
            verification="strict",
            cache=CacheConfig(num_blocks=2048),
            device=device,
        )
    return OutriderConfig(
        target=worker, speculative=spec, scheduler=SchedulerConfig(max_num_seqs=max_num_seqs)
    )


def timed_greedy(
    llm: LLM, prompts: Sequence[list[int]], max_tokens: int, batch: int
) -> tuple[list[list[int]], float, SpecStats]:
    """Greedy outputs, generated tokens/s and merged spec stats, after a short warm-up request
    (so first-call costs do not count)."""
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    llm.generate(list(prompts[:1]), SamplingParams(temperature=0.0, max_tokens=8))
    outs: list[list[int]] = []
    stats = SpecStats()
    generated = 0
    t0 = time.perf_counter()
    for i in range(0, len(prompts), batch):
        for r in llm.generate(list(prompts[i : i + batch]), params):
            outs.append(r.token_ids)
            stats.merge(r.spec)
            generated += len(r.token_ids)
    return outs, generated / (time.perf_counter() - t0), stats


def evaluate(
    drafter: str | Path,
    prompts: Sequence[list[int]],
    *,
    target: str | None = None,
    device: str = "auto",
    max_tokens: int = 128,
    batch_size: int = 1,
    num_speculative_tokens: int | None = None,
    prompt_source: str = "",
    plain: LLM | None = None,
    dtype: str = "auto",
) -> EvalReport:
    from outrider.workers.speculators import load_speculators_config

    ckpt = load_speculators_config(drafter)
    k = num_speculative_tokens or ckpt.num_speculative_tokens
    if not prompts:
        raise ConfigError("evaluation needs at least one prompt")
    plain = plain or LLM(eval_config(target, device, None, k, batch_size, dtype=dtype))
    spec = LLM(eval_config(target, device, str(drafter), k, batch_size, dtype=dtype))
    ref, tps_plain, _ = timed_greedy(plain, prompts, max_tokens, batch_size)
    got, tps_spec, stats = timed_greedy(spec, prompts, max_tokens, batch_size)
    drafts = max(stats.num_drafts, 1)
    per_pos = [a / drafts for a in stats.accepted_per_position]
    return EvalReport(
        method=ckpt.model_type,
        num_prompts=len(prompts),
        max_tokens=max_tokens,
        num_speculative_tokens=k,
        batch_size=batch_size,
        acceptance_length=stats.acceptance_length or 1.0,
        per_position=per_pos,
        tokens_per_s_spec=tps_spec,
        tokens_per_s_plain=tps_plain,
        speedup=tps_spec / tps_plain if tps_plain > 0 else 0.0,
        lossless=got == ref,
        device=str(spec.runner.device),
        prompt_source=prompt_source,
        dtype=str(spec.runner.dtype).removeprefix("torch."),
        num_identical=sum(a == b for a, b in zip(got, ref, strict=True)),
    )
