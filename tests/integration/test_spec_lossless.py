"""Speculation is lossless: greedy output with any drafter equals target-only greedy output.

Each case also runs the overlapped loop (``overlap=True``): drafts prepared while the target
verified are used only when every draft and the drafter's bonus guess were confirmed.
"""

from __future__ import annotations

import pytest

from outrider.cluster.config import OutriderConfig
from outrider.cluster.llm import LLM
from outrider.workers.config import CacheConfig, ModelConfig, SamplingParams, WorkerConfig
from outrider.workers.spec_config import SpeculativeConfig

PROMPTS = [
    [5, 6, 7, 8, 5, 6, 7, 8, 5, 6],
    [40, 41, 42],
    [9, 10, 11, 12, 13, 14, 15, 9, 10, 11, 12, 13, 14, 15, 9, 10],
    [70],
]


def _target(path: object) -> WorkerConfig:
    return WorkerConfig(
        model=ModelConfig(path=str(path), dtype="float64"), cache=CacheConfig(block_size=4)
    )


def _run(target: WorkerConfig, spec: SpeculativeConfig | None, params: SamplingParams) -> LLM:
    llm = LLM(OutriderConfig(target=target, speculative=spec))
    llm.outputs = llm.generate(PROMPTS, params)  # type: ignore[attr-defined]
    return llm


@pytest.fixture(scope="module")
def plain(tiny_model) -> dict[str, list[list[int]]]:  # type: ignore[no-untyped-def]
    out = {}
    for kind in ("llama", "qwen3_moe"):
        path, _ = tiny_model(kind)
        llm = _run(
            _target(path), None, SamplingParams(temperature=0, max_tokens=29, ignore_eos=True)
        )
        out[kind] = [o.token_ids for o in llm.outputs]  # type: ignore[attr-defined]
    return out


def _check_overlap(llm: LLM, overlap: bool) -> None:
    stats = llm.engine.stats
    if overlap:
        assert stats.num_overlap_hits + stats.num_overlap_misses > 0
    else:
        assert stats.num_overlap_hits == stats.num_overlap_misses == 0
    assert llm.runner.kv.num_used_blocks == 0
    assert llm.drafter is not None and llm.drafter.kv_usage().get("num_used_blocks", 0) == 0


@pytest.mark.parametrize("overlap", [False, True], ids=["serial", "overlap"])
@pytest.mark.parametrize("k", [1, 3, 7])
def test_ngram(k: int, overlap: bool, tiny_model, plain) -> None:  # type: ignore[no-untyped-def]
    path, _ = tiny_model("llama")
    spec = SpeculativeConfig(
        method="ngram",
        num_speculative_tokens=k,
        prompt_lookup_min=1,
        prompt_lookup_max=3,
        overlap=overlap,
    )
    llm = _run(_target(path), spec, SamplingParams(temperature=0, max_tokens=29, ignore_eos=True))
    assert [o.token_ids for o in llm.outputs] == plain["llama"]  # type: ignore[attr-defined]
    assert llm.engine.stats.spec.num_drafts > 0
    _check_overlap(llm, overlap)


@pytest.mark.parametrize(
    ("k", "drafter", "overlap"),
    [
        *[(k, d, False) for k in (1, 3, 7) for d in ("self", "dense", "moe")],
        *[(k, "self", True) for k in (1, 3, 7)],
        (3, "dense", True),
        (3, "moe", True),
    ],
)
def test_draft_model(k: int, drafter: str, overlap: bool, tiny_model, plain) -> None:  # type: ignore[no-untyped-def]
    target_path, _ = tiny_model("llama")
    draft_path = {
        "self": target_path,
        "dense": tiny_model("qwen3", seed=5)[0],
        "moe": tiny_model("qwen3_moe", seed=6)[0],
    }[drafter]
    spec = SpeculativeConfig(
        method="draft_model",
        model=str(draft_path),
        num_speculative_tokens=k,
        cache=CacheConfig(block_size=4),
        overlap=overlap,
    )
    llm = _run(
        _target(target_path), spec, SamplingParams(temperature=0, max_tokens=29, ignore_eos=True)
    )
    assert [o.token_ids for o in llm.outputs] == plain["llama"]  # type: ignore[attr-defined]
    stats = llm.engine.stats.spec
    assert stats.num_drafts > 0
    if drafter == "self":
        # the target drafting for itself accepts everything
        assert stats.num_accepted_tokens == stats.num_draft_tokens
        if overlap:
            # ... and guesses every bonus token: after the prefill no round drafts in series
            assert llm.engine.stats.num_overlap_misses == 0
    _check_overlap(llm, overlap)


def test_moe_target_with_dense_drafter(tiny_model, plain) -> None:  # type: ignore[no-untyped-def]
    target_path, _ = tiny_model("qwen3_moe")
    spec = SpeculativeConfig(
        method="draft_model", model=str(target_path), num_speculative_tokens=3, moe_backend="torch"
    )
    llm = _run(
        _target(target_path), spec, SamplingParams(temperature=0, max_tokens=29, ignore_eos=True)
    )
    assert [o.token_ids for o in llm.outputs] == plain["qwen3_moe"]  # type: ignore[attr-defined]


@pytest.mark.parametrize("overlap", [False, True], ids=["serial", "overlap"])
@pytest.mark.parametrize("cut", ["max_tokens", "stop_token", "eos"])
def test_cut_inside_accepted_block(cut: str, overlap: bool, tiny_model, plain) -> None:  # type: ignore[no-untyped-def]
    """With the target as its own drafter (k=7) every round accepts 8 tokens; cut mid-block."""
    path, _ = tiny_model("llama")
    ref = plain["llama"]
    spec = SpeculativeConfig(
        method="draft_model", model=str(path), num_speculative_tokens=7, overlap=overlap
    )
    if cut == "max_tokens":
        params = [
            SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (3, 10, 13, 1)
        ]
        want = [r[:n] for r, n in zip(ref, (3, 10, 13, 1), strict=True)]
    else:
        stops = [r[11] for r in ref]  # a token first emitted inside the second block
        want = [r[: r.index(s) + 1] for r, s in zip(ref, stops, strict=True)]
        if cut == "stop_token":
            params = [
                SamplingParams(temperature=0, max_tokens=29, stop_token_ids=[s], ignore_eos=True)
                for s in stops
            ]
        else:
            params = [SamplingParams(temperature=0, max_tokens=29) for _ in stops]
    llm = LLM(OutriderConfig(target=_target(path), speculative=spec))
    if cut == "eos":
        for s, p, w in zip(stops, PROMPTS, want, strict=True):
            llm.engine.detok.eos_token_ids = frozenset({s})
            out = llm.generate([p], SamplingParams(temperature=0, max_tokens=29))[0]
            assert out.token_ids == w and out.finish_reason == "stop"
        return
    outs = llm.generate(PROMPTS, params)
    assert [o.token_ids for o in outs] == want
    for o, w in zip(outs, want, strict=True):
        assert o.finish_reason == ("length" if cut == "max_tokens" else "stop")
        assert len(o.token_ids) == len(w)
    _check_overlap(llm, overlap)
