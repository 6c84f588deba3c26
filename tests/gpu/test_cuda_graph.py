"""CUDA-graph replays of decode and verify steps equal eager steps (Triton attention).

On the device machine: ``python -m pytest -m gpu tests/gpu/test_cuda_graph.py -q``; the graphs
are captured and replayed on CUDA. With ``OUTRIDER_TRITON_INTERPRET=1`` on CPU the same steps
run the static-buffer path without capture, with the Triton kernels in the interpreter.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

INTERPRET = os.environ.get("OUTRIDER_TRITON_INTERPRET") == "1"

from outrider.kernels.attention import triton_attn  # noqa: E402
from outrider.workers.config import (  # noqa: E402
    CacheConfig,
    KernelConfig,
    ModelConfig,
    WorkerConfig,
)
from outrider.workers.cuda_graph import GraphRunner  # noqa: E402
from outrider.workers.protocol import Delta  # noqa: E402
from outrider.workers.runner import ModelRunner  # noqa: E402

pytestmark = [] if INTERPRET else [pytest.mark.gpu]
DEVICE = "cpu" if INTERPRET else "cuda"
SIZES = (1, 2, 4)
VERIFY_Q = 5
# NOTE: float32 throughout; graph and eager steps differ only in GEMM blocking for the padded
# row count and in the attention split count (fixed at capture for max_model_len).
REL_BOUND = 1e-4


@pytest.fixture(scope="module")
def model_dir(tiny_llama: Callable[..., Path]) -> Path:
    if INTERPRET:
        small = dict(hidden_size=64, num_attention_heads=4, intermediate_size=128)
        return tiny_llama("tiny-graph", num_hidden_layers=2, **small)
    return tiny_llama("tiny-graph")


def _runner(path: Path, *, graphs: bool, backend: str = "triton") -> ModelRunner:
    kernels = KernelConfig(
        attention_backend="torch" if INTERPRET else backend,  # type: ignore[arg-type]
        enforce_eager=not graphs,
        cuda_graph_batch_sizes=list(SIZES),
        cuda_graph_max_query_len=8,
    )
    cfg = WorkerConfig(
        model=ModelConfig(path=str(path), dtype="float32", max_model_len=512),
        kernels=kernels,
        cache=CacheConfig(block_size=16, num_blocks=128),
        device=DEVICE,
    )
    runner = ModelRunner(cfg, group="target")
    if INTERPRET:
        # NOTE: the registry offers Triton on CUDA only; the interpreter runs it on CPU tensors.
        runner.attn_backend = triton_attn.BACKEND
        if graphs:
            runner.graph_runner = GraphRunner(
                runner, batch_sizes=SIZES, max_query_len=8, capture=False
            )
    return runner


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


class _Pair:
    """A graph runner and an eager runner fed the same steps."""

    def __init__(self, path: Path) -> None:
        self.graph = _runner(path, graphs=True)
        self.eager = _runner(path, graphs=False)
        assert self.eager.graph_runner is None
        gr = self.graph.graph_runner
        assert gr is not None and gr.capture_graphs == (not INTERPRET)
        self.gr = gr
        self.gen = torch.Generator().manual_seed(1)
        self.pos: dict[int, int] = {}

    def tokens(self, n: int) -> list[int]:
        return torch.randint(4, 512, (n,), generator=self.gen).tolist()

    def step(self, deltas: list[Delta], *, replayed: bool) -> float:
        before = self.gr.num_replays
        outs = []
        for runner in (self.graph, self.eager):
            batch = runner.prepare(deltas)
            hidden = runner.forward(batch).hidden_states
            assert hidden is not None
            outs.append((hidden.clone(), runner.compute_logits(hidden).argmax(-1)))
        assert self.gr.num_replays == before + (1 if replayed else 0)
        (h_graph, tok_graph), (h_eager, tok_eager) = outs
        assert h_graph.shape == h_eager.shape
        err = _rel(h_graph, h_eager)
        assert err < REL_BOUND, err
        assert torch.equal(tok_graph, tok_eager)
        for d in deltas:
            self.pos[d.seq_id] = d.end_pos
        return err

    def prefill(self, lens: list[int]) -> None:
        self.step([Delta(s, 0, self.tokens(n)) for s, n in enumerate(lens)], replayed=False)

    def decode(self, seqs: list[int], q: int = 1, *, replayed: bool = True) -> float:
        return self.step([Delta(s, self.pos[s], self.tokens(q)) for s in seqs], replayed=replayed)


@pytest.fixture()
def pair(model_dir: Path) -> _Pair:
    p = _Pair(model_dir)
    p.prefill([37, 5, 130, 64, 17] if not INTERPRET else [9, 5, 30, 16, 17])
    return p


def test_decode_and_verify_replays_equal_eager(pair: _Pair) -> None:
    captured = pair.gr.capture([1, VERIFY_Q])
    assert captured == (0 if INTERPRET else 2 * len(SIZES))
    worst = 0.0
    for seqs in ([0], [1, 2], [0, 3, 4], [4, 1, 2, 0]):  # sizes 1, 2, 4 (padded), 4
        worst = max(worst, pair.decode(seqs))
    for seqs in ([2], [0, 1, 3]):
        worst = max(worst, pair.decode(seqs, VERIFY_Q))
    # rollback: verify again from before the last drafts (the delta truncates the cache)
    for s in (0, 1, 3):
        pair.pos[s] -= 3
    worst = max(worst, pair.decode([0, 1, 3], VERIFY_Q))
    print(f"worst relative error of a replayed step: {worst:.1e}")
    assert pair.gr.num_graphs == (0 if INTERPRET else 2 * len(SIZES))


def test_uncaptured_shapes_run_eagerly(pair: _Pair) -> None:
    graphs = pair.gr.num_graphs
    pair.decode([0, 1, 2, 3, 4], replayed=False)  # 5 sequences: above the largest size
    pair.step(
        [Delta(0, pair.pos[0], pair.tokens(1)), Delta(1, pair.pos[1], pair.tokens(3))],
        replayed=False,
    )  # mixed query lengths
    pair.decode([2, 3], 9, replayed=False)  # above cuda_graph_max_query_len
    pair.decode([2, 3], 3, replayed=False)  # a new query length waits for a second step
    pair.decode([2, 3], 3, replayed=True)
    assert pair.gr.num_graphs == graphs + (0 if INTERPRET else 1)


@pytest.mark.skipif(INTERPRET, reason="captures on CUDA only")
def test_replay_does_not_sync(pair: _Pair) -> None:
    runner = pair.graph
    pair.gr.capture([1])
    batch = runner.prepare([Delta(s, pair.pos[s], pair.tokens(1)) for s in (0, 1, 2)])
    torch.cuda.synchronize()
    before = pair.gr.num_replays
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = runner.forward(batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert pair.gr.num_replays == before + 1
    assert out.hidden_states is not None and out.hidden_states.shape[0] == 3


@pytest.mark.skipif(INTERPRET, reason="CUDA graphs are CUDA-only")
def test_graph_unsafe_backend_runs_eagerly(model_dir: Path) -> None:
    assert _runner(model_dir, graphs=True, backend="torch").graph_runner is None


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_captures_on_two_gpus_keep_their_own_device() -> None:
    """A capture on cuda:1 (the drafter's) and then one on cuda:0 (the target's) in one process:
    each runs on its own GPU, Triton kernels included (torch's default capture stream would pin
    the second capture to the first one's GPU)."""
    from outrider.kernels.fused.norm import rms_norm
    from outrider.workers.cuda_graph import capture_stream

    for dev in (torch.device("cuda:1"), torch.device("cuda:0")):
        with torch.cuda.device(dev):
            x = torch.randn(4, 64, device=dev)
            w = torch.ones(64, device=dev)
            rms_norm(x, w, 1e-6)  # compile outside the capture
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=capture_stream(dev)):
                y = rms_norm(x * 2.0, w, 1e-6)
            graph.replay()
            torch.cuda.synchronize(dev)
            assert capture_stream(dev).device == dev and y.device == dev
            torch.testing.assert_close(y, rms_norm(x * 2.0, w, 1e-6))
