"""The engine (runner + verifier + round loop) against transformers on tiny random models."""

from __future__ import annotations

import pytest
import torch

from outrider.cluster.config import OutriderConfig
from outrider.cluster.llm import LLM
from outrider.workers.config import CacheConfig, ModelConfig, SamplingParams, WorkerConfig
from outrider.workers.protocol import Delta
from outrider.workers.runner import ModelRunner

STEPS = 32


def _llm(path: object, **cache: int) -> LLM:
    target = WorkerConfig(
        model=ModelConfig(path=str(path), dtype="float64"),
        cache=CacheConfig(block_size=4, **cache),
    )
    return LLM(OutriderConfig(target=target))


def _hf_greedy(model: torch.nn.Module, prompt: list[int], n: int) -> list[int]:
    """Greedy continuation by full recomputation with transformers (EOS not special)."""
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(n):
            logits = model(torch.tensor([ids])).logits[0, -1]
            ids.append(int(logits.argmax()))
    return ids[len(prompt) :]


@pytest.mark.parametrize("kind", ["llama", "qwen3", "qwen3_moe", "mixtral"])
def test_greedy_mixed_batch_matches_transformers(kind: str, tiny_model) -> None:  # type: ignore[no-untyped-def]
    path, ref = tiny_model(kind)
    llm = _llm(path)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(4, 96, (n,), generator=g).tolist() for n in (3, 11, 6, 17)]
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=STEPS, ignore_eos=True))
    for prompt, out in zip(prompts, outs, strict=True):
        assert out.token_ids == _hf_greedy(ref, prompt, STEPS)
        assert out.finish_reason == "length"


def test_requests_join_and_leave_between_rounds(tiny_model) -> None:  # type: ignore[no-untyped-def]
    path, ref = tiny_model("llama")
    llm = _llm(path)
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13], [20, 21]]
    lengths = [4, 12, 8]
    seqs = [
        llm.engine.add_request(
            prompts[0], SamplingParams(temperature=0, max_tokens=lengths[0], ignore_eos=True)
        )
    ]
    llm.engine.step()
    llm.engine.step()
    for p, n in zip(prompts[1:], lengths[1:], strict=True):
        seqs.append(
            llm.engine.add_request(p, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
        )
    while llm.engine.has_unfinished():
        llm.engine.step()
    for seq, p, n in zip(seqs, prompts, lengths, strict=True):
        assert seq.output_token_ids == _hf_greedy(ref, p, n)
    assert llm.runner.kv.num_used_blocks == 0


def test_preemption_under_a_small_cache_keeps_outputs(tiny_model) -> None:  # type: ignore[no-untyped-def]
    path, ref = tiny_model("llama")
    llm = _llm(path, num_blocks=12)
    prompts = [[5, 6, 7, 8], [9, 10, 11], [20, 21, 22, 23, 24]]
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=14, ignore_eos=True))
    assert llm.engine.stats.num_preemptions > 0
    for p, out in zip(prompts, outs, strict=True):
        assert out.token_ids == _hf_greedy(ref, p, 14)


def test_decoding_after_truncate_equals_decoding_from_scratch(tiny_model) -> None:  # type: ignore[no-untyped-def]
    path, _ = tiny_model("qwen3")
    runner = ModelRunner(
        WorkerConfig(
            model=ModelConfig(path=str(path), dtype="float64"), cache=CacheConfig(block_size=4)
        )
    )
    tokens = [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17]

    def logits(seq_id: int, start: int, toks: list[int]) -> torch.Tensor:
        batch = runner.prepare([Delta(seq_id, start, toks)])
        out = runner.forward(batch)
        assert out.hidden_states is not None
        return runner.compute_logits(out.hidden_states[-1:])

    logits(1, 0, tokens)  # 11 tokens cached
    logits(1, 11, [40, 41, 42])  # speculative tokens that get rolled back
    rolled = logits(1, 6, [50, 51])  # truncate to 6, then append
    fresh = logits(2, 0, tokens[:6] + [50, 51])
    torch.testing.assert_close(rolled, fresh, rtol=1e-12, atol=1e-12)
    assert runner.kv.num_tokens(1) == 8
