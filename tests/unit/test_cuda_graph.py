"""The CUDA-graph runner's static-buffer path on CPU: padded steps equal plain eager steps.

``GraphRunner(capture=False)`` runs the same copy → forward on static buffers → slice path that
a replay runs, so padding, the scratch block and the fitting rules are checked here without a
GPU (tests/gpu/test_cuda_graph.py captures and replays on CUDA).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from outrider.workers.config import (
    CacheConfig,
    ConfigError,
    KernelConfig,
    ModelConfig,
    SamplingParams,
    WorkerConfig,
)
from outrider.workers.cuda_graph import GraphRunner, graph_blockers, padded_batch_size
from outrider.workers.models.base import ModelOutput
from outrider.workers.protocol import Delta
from outrider.workers.runner import ModelRunner
from outrider.workers.verifier import Verifier, VerifyItem

BLOCK = 4
SIZES = (1, 2, 4)


def _runner(path: Path, static: bool) -> ModelRunner:
    cfg = WorkerConfig(
        model=ModelConfig(path=str(path), dtype="float64", max_model_len=128),
        cache=CacheConfig(block_size=BLOCK, num_blocks=96),
        device="cpu",
    )
    runner = ModelRunner(cfg, group="target")
    assert runner.graph_runner is None  # CPUs run eagerly by default
    if static:
        runner.graph_runner = GraphRunner(runner, batch_sizes=SIZES, max_query_len=5, capture=False)
    return runner


def _step(runner: ModelRunner, deltas: list[Delta], aux: tuple[int, ...] = ()) -> ModelOutput:
    return runner.forward(runner.prepare(deltas), aux_layer_ids=aux)


def _same(a: ModelOutput, b: ModelOutput) -> None:
    assert a.hidden_states is not None and b.hidden_states is not None
    assert a.hidden_states.shape == b.hidden_states.shape
    torch.testing.assert_close(a.hidden_states, b.hidden_states, rtol=1e-10, atol=1e-10)
    assert sorted(a.aux_hidden_states) == sorted(b.aux_hidden_states)
    for i, t in a.aux_hidden_states.items():
        torch.testing.assert_close(t, b.aux_hidden_states[i], rtol=1e-10, atol=1e-10)


def test_padded_batch_size() -> None:
    assert padded_batch_size(1, SIZES) == 1
    assert padded_batch_size(3, (4, 1, 2)) == 4
    assert padded_batch_size(4, SIZES) == 4
    assert padded_batch_size(5, SIZES) is None
    assert padded_batch_size(0, SIZES) is None


def test_kernel_config_validation() -> None:
    KernelConfig().validate()
    with pytest.raises(ConfigError, match=r"`target.kernels.cuda_graph_batch_sizes` must be >= 1"):
        KernelConfig(cuda_graph_batch_sizes=[1, 0]).validate("target.kernels")
    with pytest.raises(ConfigError, match="must not be empty"):
        KernelConfig(cuda_graph_batch_sizes=[]).validate()
    with pytest.raises(ConfigError, match="must not repeat"):
        KernelConfig(cuda_graph_batch_sizes=[2, 2]).validate()
    with pytest.raises(ConfigError, match=r"cuda_graph_max_query_len` must be in \[1, 33\], got 0"):
        KernelConfig(cuda_graph_max_query_len=0).validate()


def test_runner_rejects_bad_kernel_config(tiny_model) -> None:  # type: ignore[no-untyped-def]
    path, _ = tiny_model("llama")
    cfg = WorkerConfig(
        model=ModelConfig(path=str(path), dtype="float64"),
        kernels=KernelConfig(cuda_graph_max_query_len=40),
        device="cpu",
    )
    with pytest.raises(ConfigError, match="`target.kernels.cuda_graph_max_query_len`"):
        ModelRunner(cfg, group="target")


def test_cpu_backends_are_not_graph_safe(tiny_model) -> None:  # type: ignore[no-untyped-def]
    path, _ = tiny_model("qwen3_moe")
    runner = _runner(path, static=False)
    reasons = graph_blockers(runner.model, runner.attn_backend)
    assert reasons == [
        "attention backend 'torch' is not CUDA-graph safe",
        "moe backend 'torch' is not CUDA-graph safe",
    ]


@pytest.mark.parametrize("kind", ["llama", "qwen3_moe"])
def test_padded_static_steps_equal_eager(kind: str, tiny_model) -> None:  # type: ignore[no-untyped-def]
    path, _ = tiny_model(kind)
    plain, static = _runner(path, static=False), _runner(path, static=True)
    gr = static.graph_runner
    assert gr is not None
    g = torch.Generator().manual_seed(0)
    lens = [7, 13, 4, 21, 9]
    toks = {s: torch.randint(4, 96, (n,), generator=g).tolist() for s, n in enumerate(lens)}

    def both(deltas: list[Delta], aux: tuple[int, ...] = (), replayed: bool = True) -> None:
        before = gr.num_replays
        _same(_step(static, deltas, aux), _step(plain, deltas, aux))
        assert gr.num_replays == before + (1 if replayed else 0), deltas

    # prefill: mixed query lengths run eagerly
    both([Delta(s, 0, t) for s, t in toks.items()], replayed=False)
    pos = dict(enumerate(lens))

    def decode(seqs: list[int], aux: tuple[int, ...] = (), replayed: bool = True) -> None:
        deltas = [Delta(s, pos[s], [int(torch.randint(4, 96, (1,), generator=g))]) for s in seqs]
        both(deltas, aux, replayed)
        for s in seqs:
            pos[s] += 1

    decode([0])  # batch 1
    decode([0, 1, 2])  # padded to 4
    decode([3, 1], aux=(0, 2, 4))  # padded to 2, aux hidden states through the static path
    decode([0, 1, 2, 3, 4], replayed=False)  # more than the largest size: eager

    def verify(seqs: list[int], q: int, replayed: bool, rollback: int = 0) -> None:
        deltas = []
        for s in seqs:
            pos[s] -= rollback
            deltas.append(Delta(s, pos[s], torch.randint(4, 96, (q,), generator=g).tolist()))
        both(deltas, replayed=replayed)
        for s in seqs:
            pos[s] += q

    verify([0, 2, 4], 5, replayed=False)  # a query length above 1 waits for a second step
    verify([1, 3, 4], 5, replayed=True, rollback=2)  # rollback then append, padded to 4
    verify([0, 1], 3, replayed=False)
    verify([2], 3, replayed=True, rollback=1)  # a second step of 3 tokens in a row
    verify([0, 1], 6, replayed=False)  # above max_query_len
    verify([0, 1], 6, replayed=False)
    verify([3, 4], 3, replayed=True)  # once ready, a length stays ready
    both([Delta(0, pos[0], [5]), Delta(1, pos[1], [6, 7])], replayed=False)  # mixed lengths
    both([Delta(7, 0, [5, 6, 7])], replayed=False)  # 3 tokens, but a prefill
    # NOTE: real blocks hold the same K/V in both runners; padding went to the scratch block.
    n = plain.num_blocks
    for (kp, vp), (ks, vs) in zip(plain.kv_caches, static.kv_caches, strict=True):
        torch.testing.assert_close(kp[:n], ks[:n], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(vp[:n], vs[:n], rtol=1e-10, atol=1e-10)
    assert float(static.kv_caches[0][0][static.scratch_block].abs().sum()) > 0
    assert float(plain.kv_caches[0][0][plain.scratch_block].abs().sum()) == 0


def test_verifier_rounds_through_static_buffers(tiny_model) -> None:  # type: ignore[no-untyped-def]
    path, _ = tiny_model("qwen3")
    outs = []
    for static in (False, True):
        runner = _runner(path, static=static)
        if runner.graph_runner is not None:
            runner.graph_runner.capture([4])
        verifier = Verifier(runner, aux_layer_ids=(1, 4))
        params = SamplingParams(temperature=0.0, max_tokens=64)
        prompts = {0: [5, 6, 7, 8, 9], 1: [10, 11, 12], 2: [40, 41, 42, 43]}
        first = [VerifyItem(Delta(s, 0, p), params=params) for s, p in prompts.items()]
        res = verifier.verify(first)
        got = [list(r) for r in res.output_token_ids]
        pos = {s: len(p) for s, p in prompts.items()}
        for _ in range(3):
            # the target drafts for itself: its own next tokens, then three fixed guesses
            items = [VerifyItem(Delta(s, pos[s], [got[s][-1]]), [7, 8, 9]) for s in prompts]
            res = verifier.verify(items)
            for s in prompts:
                pos[s] += 1 + res.num_accepted[s]
                got[s] += res.output_token_ids[s]
        outs.append((got, res.hidden_states))
        if static:
            assert runner.graph_runner is not None and runner.graph_runner.num_replays == 3
    assert outs[0][0] == outs[1][0]
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=1e-10, atol=1e-10)


def test_ragged_drafts_are_padded_to_one_graph(tiny_model) -> None:  # type: ignore[no-untyped-def]
    """Rounds whose sequences draft different numbers of tokens (k cut near max_tokens, or k
    changing between rounds) run through the static buffers at one query length and give what
    each sequence verified alone gives; with k configured, every query length 2..k+1 is ready
    from the first such round."""
    path, _ = tiny_model("llama")
    drafts_per_round = [[3, 1, 0], [2, 3, 3], [0, 2, 1], [3, 3, 3]]
    outs = []
    for static in (False, True):
        runner = _runner(path, static=static)
        verifier = Verifier(runner, aux_layer_ids=(1, 2), num_speculative_tokens=3)
        params = SamplingParams(temperature=0.0, max_tokens=64)
        prompts = {0: [5, 6, 7, 8, 9], 1: [10, 11, 12], 2: [40, 41, 42, 43]}
        res = verifier.verify(
            [VerifyItem(Delta(s, 0, p), params=params) for s, p in prompts.items()]
        )
        got = [list(r) for r in res.output_token_ids]
        pos = {s: len(p) for s, p in prompts.items()}
        hidden = [res.hidden_states]
        for ks in drafts_per_round:
            items = [
                VerifyItem(Delta(s, pos[s], [got[s][-1]]), [7, 8, 9][: ks[s]]) for s in prompts
            ]
            # NOTE: eagerly each sequence alone (nothing to pad), statically the batch (padded)
            parts = (
                [verifier.verify([it]) for it in items] if not static else [verifier.verify(items)]
            )
            accepted = [n for r in parts for n in r.num_accepted]
            tokens = [t for r in parts for t in r.output_token_ids]
            for s in prompts:
                pos[s] += 1 + accepted[s]
                got[s] += tokens[s]
            hidden.append(torch.cat([r.hidden_states for r in parts]))
        outs.append((got, hidden, [n for r in parts for n in r.hidden_rows]))
        if static:
            gr = runner.graph_runner
            assert gr is not None and gr.num_replays == len(drafts_per_round)
            assert gr._ready_query_lens >= {1, 2, 3, 4}
    assert outs[0][0] == outs[1][0] and outs[0][2] == outs[1][2]
    for a, b in zip(outs[0][1], outs[1][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_verifier_readies_every_verify_length_up_front(tiny_model) -> None:  # type: ignore[no-untyped-def]
    """With k configured, the query lengths 1..k+1 (k = 0 included: rounds the goodput policy
    runs without drafts) are expected before any round: a batch size's first capture takes them
    all, at that size and every smaller one (none is captured mid-run when k changes or the
    batch shrinks)."""
    path, _ = tiny_model("llama")
    runner = _runner(path, static=True)
    Verifier(runner, num_speculative_tokens=3)
    gr = runner.graph_runner
    assert gr is not None and gr._expected_query_lens == {1, 2, 3, 4}
    assert gr._ready_query_lens == {1, 2, 3, 4}
    # which graphs a first capture takes (the capture itself needs CUDA: recorded here)
    taken: list[tuple[int, int, tuple[int, ...]]] = []

    def record(size: int, q: int, aux: tuple[int, ...]) -> object:
        taken.append((size, q, aux))
        gr._graphs[(size, q, aux)] = object()  # type: ignore[assignment]
        return gr._graphs[(size, q, aux)]

    gr._capture = record  # type: ignore[method-assign]
    assert gr._capture_with_expected(4, 2, (1,)) is not None
    assert taken[0] == (4, 2, (1,))  # largest first: the others reuse its memory pool
    assert sorted(taken) == [(b, q, (1,)) for b in (1, 2, 4) for q in (1, 2, 3, 4)]
    taken.clear()
    gr._capture_with_expected(2, 1, ())  # other aux layers: graphs of their own
    assert sorted(taken) == [(b, q, ()) for b in (1, 2) for q in (1, 2, 3, 4)]
