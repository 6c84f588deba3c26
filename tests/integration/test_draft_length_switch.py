"""Draft length switched per round (k = 0 is plain decoding) stays lossless for every drafter.

A drafter that sat out rounds (k = 0: not called at all) is caught up from its cursor by the
next delta, hidden-state rows included; greedy output must equal plain greedy decoding.
"""

from __future__ import annotations

import copy
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from outrider.cluster.config import OutriderConfig
from outrider.cluster.draft_length import GoodputDraftLength
from outrider.cluster.llm import LLM
from outrider.workers.config import CacheConfig, ModelConfig, SamplingParams, WorkerConfig
from outrider.workers.spec_config import GoodputConfig, SpeculativeConfig

PROMPTS = [
    [5, 6, 7, 8, 5, 6, 7, 8, 5, 6],
    [40, 41, 42],
    [9, 10, 11, 12, 13, 14, 15, 9, 10, 11, 12, 13, 14, 15, 9, 10],
    [70],
]
GREEDY = SamplingParams(temperature=0, max_tokens=29, ignore_eos=True)
# NOTE: k per round, cycled: off for one and several rounds, back on at other lengths.
PATTERN = [3, 0, 2, 0, 0, 0, 3, 1, 0, 3, 3, 0, 2]


def _target(path: object) -> WorkerConfig:
    return WorkerConfig(
        model=ModelConfig(path=str(path), dtype="float64"), cache=CacheConfig(block_size=4)
    )


def _plain(path: object) -> list[list[int]]:
    llm = LLM(OutriderConfig(target=_target(path)))
    return [o.token_ids for o in llm.generate(PROMPTS, GREEDY)]


def _check_switching(llm: LLM, plain: list[list[int]], policy: Any) -> None:
    llm.engine.policy = policy
    outs = llm.generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in outs] == plain
    by_k = llm.engine.stats.rounds_by_k
    assert by_k.get(0, 0) >= 5 and sum(n for k, n in by_k.items() if k > 0) >= 5, by_k
    stats = llm.engine.stats.spec
    assert stats.num_drafts > 0 and stats.num_accepted_tokens > 0
    assert llm.runner.kv.num_used_blocks == 0


@pytest.mark.parametrize("overlap", [False, True], ids=["serial", "overlap"])
def test_ngram(overlap: bool, tiny_model, pattern_draft_length) -> None:  # type: ignore[no-untyped-def]
    path, _ = tiny_model("llama")
    spec = SpeculativeConfig(
        method="ngram",
        num_speculative_tokens=3,
        prompt_lookup_min=1,
        prompt_lookup_max=3,
        overlap=overlap,
    )
    llm = LLM(OutriderConfig(target=_target(path), speculative=spec))
    _check_switching(llm, _plain(path), pattern_draft_length(3, PATTERN))


@pytest.mark.parametrize("overlap", [False, True], ids=["serial", "overlap"])
@pytest.mark.parametrize("drafter", ["self", "dense"])
def test_draft_model(drafter: str, overlap: bool, tiny_model, pattern_draft_length) -> None:  # type: ignore[no-untyped-def]
    """With overlap, prepared drafts are cut to a shorter k, or dropped when k goes to 0."""
    path, _ = tiny_model("llama")
    draft = path if drafter == "self" else tiny_model("qwen3", seed=5)[0]
    spec = SpeculativeConfig(
        method="draft_model",
        model=str(draft),
        num_speculative_tokens=3,
        cache=CacheConfig(block_size=4),
        overlap=overlap,
    )
    llm = LLM(OutriderConfig(target=_target(path), speculative=spec))
    _check_switching(llm, _plain(path), pattern_draft_length(3, PATTERN))
    if overlap and drafter == "self":
        assert llm.engine.stats.num_overlap_hits > 0


@pytest.mark.parametrize("method", ["eagle3", "peagle"])
def test_eagle3_family(  # type: ignore[no-untyped-def]
    method: str, tiny_model, tmp_path: Path, pattern_draft_length, eagle3_helpers: ModuleType
) -> None:
    """Hidden-state rows of the skipped rounds reach the drafter with its catch-up delta."""
    helpers = eagle3_helpers
    _, base = tiny_model("llama")
    model = copy.deepcopy(base)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.mul_(0.01)
    target = tmp_path / "target"
    model.save_pretrained(target)
    cfg = helpers.layer_config("llama", num_key_value_heads=4, attention_bias=True, rope_theta=2.0)
    peagle = method == "peagle"
    tensors = helpers.tracking_tensors(model, cfg, peagle=peagle)
    if peagle:
        tensors["embed_tokens.weight"] = model.state_dict()["model.embed_tokens.weight"]
    extra = {"norm_before_residual": False} if peagle else {}
    ckpt = helpers.write_checkpoint(
        tmp_path / method,
        tensors,
        cfg,
        model_type=method,
        aux_ids=[1, 3],
        dtype=torch.float64,
        **extra,
    )
    spec = SpeculativeConfig(model=str(ckpt), num_speculative_tokens=3)
    llm = LLM(OutriderConfig(target=_target(target), speculative=spec))
    assert llm.drafter is not None and llm.drafter.capabilities.needs_target_hidden_states
    _check_switching(llm, _plain(target), pattern_draft_length(3, PATTERN))


def test_goodput_policy_switches_off_and_probes(tiny_model) -> None:  # type: ignore[no-untyped-def]
    """The real policy: no acceptance expected, so plain decoding, with probes that draft."""
    path, _ = tiny_model("llama")
    spec = SpeculativeConfig(
        method="draft_model",
        model=str(tiny_model("qwen3", seed=5)[0]),
        num_speculative_tokens=3,
        draft_length_policy="goodput",
        goodput=GoodputConfig(acceptance_prior=0.0, prior_weight=1e6, probe_interval=3),
    )
    llm = LLM(OutriderConfig(target=_target(path), speculative=spec))
    assert isinstance(llm.engine.policy, GoodputDraftLength)
    outs = llm.generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in outs] == _plain(path)
    by_k = llm.engine.stats.rounds_by_k
    probes = sum(n for k, n in by_k.items() if k > 0)
    assert by_k.get(0, 0) > probes > 0 and probes <= sum(by_k.values()) // 3 + 1, by_k
    assert llm.engine.stats.spec.num_drafts > 0


def test_cost_model_sees_steady_verifies_and_every_draft_with_its_context(
    tiny_model, pattern_draft_length
) -> None:  # type: ignore[no-untyped-def]  # noqa: E501
    """Prefill verifies are not fed to the cost model (their time grows with their length);
    every drafter call is, with the confirmed tokens it ingested: the catch-up after rounds at
    k = 0 ingests many, and it is the only drafter time a policy that switched off sees."""
    path, _ = tiny_model("llama")
    spec = SpeculativeConfig(
        method="ngram", num_speculative_tokens=3, prompt_lookup_min=1, prompt_lookup_max=3
    )
    llm = LLM(OutriderConfig(target=_target(path), speculative=spec))
    seen: dict[str, list[int]] = {"verify": [], "draft": []}
    proposes: list[int] = []

    class Recording(pattern_draft_length):  # type: ignore[misc, valid-type]
        def observe_verify(self, num_tokens: int, seconds: float) -> None:
            seen["verify"].append(num_tokens)

        def observe_draft(
            self, num_steps: int, num_tokens: int, seconds: float, context_tokens: int = 0
        ) -> None:
            seen["draft"].append(context_tokens)

    inner = llm.engine._propose

    def counted(items: Any, mode: Any) -> Any:
        proposes.append(sum(len(it.delta.token_ids) for it in items))
        return inner(items, mode)

    llm.engine._propose = counted  # type: ignore[method-assign]
    llm.engine.policy = Recording(3, PATTERN)
    outs = llm.generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in outs] == _plain(path)
    rounds = llm.engine.stats.num_rounds
    # NOTE: steady rounds verify at most k + 1 tokens per sequence; the prefill (30) is not seen
    assert seen["verify"] and max(seen["verify"]) <= len(PROMPTS) * 4
    assert len(seen["verify"]) < rounds
    assert seen["draft"] == proposes
    assert max(proposes) > len(PROMPTS) * 4  # catch-ups (and first proposes) are among them


def test_calls_that_captured_graphs_are_not_fed_to_the_cost_model(
    tiny_model, pattern_draft_length
) -> None:  # type: ignore[no-untyped-def]  # noqa: E501
    """A call that captured CUDA graphs reports it; its time (mostly the capture) is left out."""
    path, _ = tiny_model("llama")
    spec = SpeculativeConfig(
        method="ngram", num_speculative_tokens=3, prompt_lookup_min=1, prompt_lookup_max=3
    )
    llm = LLM(OutriderConfig(target=_target(path), speculative=spec))
    seen: list[int] = []
    marked: list[int] = []

    class Recording(pattern_draft_length):  # type: ignore[misc, valid-type]
        def observe_verify(self, num_tokens: int, seconds: float) -> None:
            seen.append(num_tokens)

    verify = llm.verifier.verify

    def capturing(items: Any) -> Any:
        res = verify(items)
        # NOTE: as if every third steady round had captured a graph
        if all(len(it.delta.token_ids) == 1 for it in items) and len(seen) % 3 == 0:
            res.captured_graphs = True
            marked.append(1)
        return res

    llm.engine.target.verify = capturing  # type: ignore[method-assign]
    llm.engine.policy = Recording(3, [3, 0, 2])
    llm.generate(PROMPTS, GREEDY)
    steady = llm.engine.stats.num_rounds - 1  # every round but the prefill
    assert marked and len(seen) == steady - len(marked)
