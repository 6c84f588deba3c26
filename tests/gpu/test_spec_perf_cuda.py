"""Draft length by load, overlap and synthetic acceptance on CUDA (with CUDA graphs on).

Switching k round to round changes the verify step's shape (k + 1 query tokens, or 1 when
k = 0); overlapped rounds interleave drafter and target calls. Greedy output must still equal
plain decoding on the same GPU, and synthetic acceptance must accept at its rates.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

pytestmark = pytest.mark.gpu

PROMPTS = [[5, 6, 7, 8], [9, 10], [20, 21, 22, 23, 24, 25, 26, 27, 28], [30, 31, 30, 31, 30]]
PATTERN = [4, 0, 2, 0, 0, 3, 1, 4, 4, 0]


def _llm(path: Path, drafter_device: str = "cuda", **spec: Any) -> Any:
    from outrider.cluster.config import OutriderConfig
    from outrider.cluster.llm import LLM
    from outrider.workers.config import CacheConfig, ModelConfig, WorkerConfig
    from outrider.workers.spec_config import SpeculativeConfig

    target = WorkerConfig(
        model=ModelConfig(path=str(path), dtype="float32"),
        cache=CacheConfig(block_size=16, num_blocks=512),
        device="cuda",
    )
    speculative = (
        SpeculativeConfig(
            method="draft_model",
            model=str(path),
            num_speculative_tokens=4,
            device=drafter_device,
            cache=CacheConfig(block_size=16, num_blocks=512),
            **spec,
        )
        if spec or drafter_device != "cuda"
        else None
    )
    return LLM(OutriderConfig(target=target, speculative=speculative))


def _greedy() -> Any:
    from outrider.workers.config import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)


@pytest.fixture(scope="module")
def plain(tiny_dir: Path) -> list[list[int]]:
    return [o.token_ids for o in _llm(tiny_dir).generate(PROMPTS, _greedy())]


@pytest.mark.parametrize("overlap", [False, True], ids=["serial", "overlap"])
def test_switching_k_is_lossless(
    tiny_dir: Path, plain: list[list[int]], overlap: bool, pattern_draft_length: Any
) -> None:
    llm = _llm(tiny_dir, overlap=overlap)
    llm.engine.policy = pattern_draft_length(4, PATTERN)
    assert [o.token_ids for o in llm.generate(PROMPTS, _greedy())] == plain
    by_k = llm.engine.stats.rounds_by_k
    assert by_k.get(0, 0) > 0 and sum(n for k, n in by_k.items() if k > 0) > 0, by_k
    if overlap:
        assert llm.engine.stats.num_overlap_hits > 0
    assert llm.runner.kv.num_used_blocks == 0


@pytest.mark.parametrize("overlap", [False, True], ids=["serial", "overlap"])
def test_goodput_policy_is_lossless(tiny_dir: Path, plain: list[list[int]], overlap: bool) -> None:
    from outrider.workers.spec_config import GoodputConfig

    llm = _llm(
        tiny_dir,
        overlap=overlap,
        draft_length_policy="goodput",
        goodput=GoodputConfig(probe_interval=3),
    )
    assert [o.token_ids for o in llm.generate(PROMPTS, _greedy())] == plain
    st = llm.engine.stats
    assert st.num_rounds > 0 and st.verify_s > 0 and st.wall_s >= st.overhead_s >= 0


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("overlap", [False, True], ids=["serial", "overlap"])
def test_drafter_on_its_own_gpu_in_process(
    tiny_dir: Path, plain: list[list[int]], overlap: bool
) -> None:
    """Target on cuda:0, drafter (the target itself) on cuda:1, one process: every draft of a
    self-drafter is accepted only if the drafter's kernels ran on its own GPU, in order with its
    torch ops (Triton launches on the current device)."""
    torch.cuda.set_device(0)
    llm = _llm(tiny_dir, drafter_device="cuda:1", overlap=overlap)
    assert str(llm.runner.device) in ("cuda", "cuda:0")
    assert str(llm.drafter.runner.device) == "cuda:1"
    assert [o.token_ids for o in llm.generate(PROMPTS, _greedy())] == plain
    spec = llm.engine.stats.spec
    assert spec.num_drafts > 0
    assert spec.accepted_per_position[0] >= 0.95 * spec.num_drafts, spec.accepted_per_position


def test_synthetic_acceptance_rates_on_cuda(tiny_dir: Path) -> None:
    from outrider.workers.config import CacheConfig, ModelConfig, SamplingParams, WorkerConfig
    from outrider.workers.protocol import Delta
    from outrider.workers.runner import ModelRunner
    from outrider.workers.verifier import Verifier, VerifyItem

    rates = [0.9, 0.6, 0.3, 0.1]
    runner = ModelRunner(
        WorkerConfig(
            model=ModelConfig(path=str(tiny_dir), dtype="float32"),
            cache=CacheConfig(block_size=16, num_blocks=512),
            device="cuda",
        ),
        group="target",
    )
    verifier = Verifier(runner, verification="synthetic", synthetic_rates=rates)
    gen = torch.Generator().manual_seed(0)
    accepted = [0] * len(rates)
    total = 0
    for r in range(20):
        items = []
        for s in range(64):
            params = None
            if r == 0:
                params = SamplingParams(temperature=0.0 if s % 2 else 1.0, max_tokens=8, seed=s)
            drafts = torch.randint(0, 512, (len(rates),), generator=gen).tolist()
            items.append(VerifyItem(Delta(s, 0, PROMPTS[s % len(PROMPTS)]), drafts, None, params))
        res = verifier.verify(items)
        for it, out, n in zip(items, res.output_token_ids, res.num_accepted, strict=True):
            assert out[:n] == it.draft_token_ids[:n] and len(out) == n + 1
            for i in range(n):
                accepted[i] += 1
        total += len(items)
    for i, p in enumerate(rates):
        sd = math.sqrt(p * (1 - p) / total)
        assert abs(accepted[i] / total - p) <= 5 * sd, (i, accepted[i] / total, p)
