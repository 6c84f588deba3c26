"""Stop strings that fire inside a block of accepted drafts cut the output exactly there."""

from __future__ import annotations

import pytest

from outrider.cluster.config import OutriderConfig
from outrider.cluster.llm import LLM
from outrider.workers.config import ModelConfig, SamplingParams, WorkerConfig
from outrider.workers.spec_config import SpeculativeConfig

PROMPT = "Repeat exactly, five times: red green blue yellow red green blue yellow"


@pytest.fixture(scope="module")
def llm() -> LLM:
    spec = SpeculativeConfig(
        method="ngram", num_speculative_tokens=7, prompt_lookup_min=1, prompt_lookup_max=4
    )
    return LLM(
        OutriderConfig(target=WorkerConfig(model=ModelConfig(dtype="float32")), speculative=spec)
    )


def test_stop_strings_inside_accepted_blocks(llm: LLM) -> None:
    ids = llm.encode(PROMPT, chat=True)
    k, llm.engine.k = llm.engine.k, 0  # target-only decoding for the reference
    plain = llm.generate([ids], SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True))[0]
    llm.engine.k = k
    spec = llm.generate([ids], SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True))[0]
    assert spec.token_ids == plain.token_ids
    assert spec.spec.num_accepted_tokens > spec.spec.num_drafts  # blocks of several tokens
    words = plain.text.split()
    assert len(words) >= 12, plain.text
    for stop in {words[4], words[7] + " " + words[8], words[11][:3]}:
        out = llm.generate(
            [ids], SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True, stop=[stop])
        )[0]
        cut = plain.text.index(stop)
        assert out.text == plain.text[:cut], (stop, out.text)
        assert out.finish_reason == "stop"
        # the kept tokens are a prefix of the plain run (nothing after the stop's token)
        assert out.token_ids == plain.token_ids[: len(out.token_ids)]
    assert llm.runner.kv.num_used_blocks == 0
