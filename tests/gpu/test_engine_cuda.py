"""The engine on CUDA: Triton attention and sampling inside real generation.

Greedy tokens with the Triton backends equal those with the torch references on the same GPU,
and speculation (the target drafting for itself) is lossless there too.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu

PROMPTS = [[5, 6, 7, 8], [9, 10], [20, 21, 22, 23, 24, 25, 26, 27, 28]]


def _generate(path: Path, attention: str, spec: bool) -> tuple[list[list[int]], object]:
    from outrider.cluster.config import OutriderConfig
    from outrider.cluster.llm import LLM
    from outrider.workers.config import (
        CacheConfig,
        KernelConfig,
        ModelConfig,
        SamplingParams,
        WorkerConfig,
    )
    from outrider.workers.spec_config import SpeculativeConfig

    target = WorkerConfig(
        model=ModelConfig(path=str(path), dtype="float32"),
        kernels=KernelConfig(attention_backend=attention),  # type: ignore[arg-type]
        cache=CacheConfig(block_size=16, num_blocks=256),
        device="cuda",
    )
    speculative = (
        SpeculativeConfig(
            method="draft_model",
            model=str(path),
            num_speculative_tokens=4,
            device="cuda",
            attention_backend=attention,  # type: ignore[arg-type]
        )
        if spec
        else None
    )
    llm = LLM(OutriderConfig(target=target, speculative=speculative))
    assert llm.runner.attention_backend == attention
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))
    return [o.token_ids for o in outs], llm


def test_triton_attention_generation_equals_torch_reference(tiny_dir: Path) -> None:
    ref, _ = _generate(tiny_dir, "torch", spec=False)
    got, llm = _generate(tiny_dir, "triton", spec=False)
    assert got == ref
    assert llm.verifier.sampling_backend == "triton"  # type: ignore[attr-defined]


def test_speculation_on_cuda_is_lossless(tiny_dir: Path) -> None:
    plain, _ = _generate(tiny_dir, "triton", spec=False)
    spec, llm = _generate(tiny_dir, "triton", spec=True)
    assert spec == plain
    stats = llm.engine.stats.spec  # type: ignore[attr-defined]
    assert stats.num_drafts > 0 and stats.num_accepted_tokens == stats.num_draft_tokens
