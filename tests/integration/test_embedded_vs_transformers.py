"""The embedded SmolLM2 GGUF: outrider's greedy tokens equal transformers' generate()."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from outrider.cluster.config import OutriderConfig
from outrider.cluster.llm import LLM
from outrider.workers.config import ModelConfig, SamplingParams, WorkerConfig
from outrider.workers.models.loader import resolve_model_path

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain recursion to a child in two sentences.",
    "List three uses of a paperclip.",
    "Why do cats purr?",
]
MAX_TOKENS = 64


@pytest.fixture(scope="module")
def llm() -> LLM:
    cfg = OutriderConfig(target=WorkerConfig(model=ModelConfig(dtype="float32")))
    return LLM(cfg)


@pytest.fixture(scope="module")
def hf_model() -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(None)
    model = AutoModelForCausalLM.from_pretrained(
        str(Path(path).parent), gguf_file=Path(path).name, dtype=torch.float32
    )
    return model.eval()


def test_greedy_chat_matches_transformers(llm: LLM, hf_model: torch.nn.Module) -> None:
    ids = [llm.encode(p, chat=True) for p in PROMPTS]
    outs = llm.generate(ids, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS))
    for prompt_ids, out in zip(ids, outs, strict=True):
        with torch.inference_mode():
            ref = hf_model.generate(
                torch.tensor([prompt_ids]),
                do_sample=False,
                max_new_tokens=MAX_TOKENS,
                pad_token_id=llm.tokenizer.pad_token_id or 0,
            )[0, len(prompt_ids) :].tolist()
        assert out.token_ids == ref, (
            llm.tokenizer.decode(out.token_ids),
            llm.tokenizer.decode(ref),
        )
        assert out.finish_reason == ("stop" if len(ref) < MAX_TOKENS else "length")


def test_batched_equals_solo(llm: LLM) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=24)
    ids = [llm.encode(p, chat=True) for p in PROMPTS]
    batched = llm.generate(ids, params)
    for prompt_ids, out in zip(ids, batched, strict=True):
        assert llm.generate([prompt_ids], params)[0].token_ids == out.token_ids
