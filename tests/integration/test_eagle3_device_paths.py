"""EAGLE-3 drafting on the device paths: the draft-step CUDA graphs against the eager loop, and
a drafter on a second GPU (its kernels launch on its own device). Checkpoints come from the
helpers of ``test_eagle3.py``."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from outrider.kernels.fused import skinny_table
from outrider.workers.config import SamplingParams
from outrider.workers.proposers.base import DraftMode, ProposeItem
from outrider.workers.proposers.context_graph import DraftContextGraphs
from outrider.workers.proposers.draft_graph import DraftStepGraphs
from outrider.workers.protocol import Delta

_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize(
    "device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, _CUDA])], ids=str
)
@pytest.mark.parametrize("case", ["llama-eagle3", "qwen3-eagle3-d2t-norms"])
def test_draft_step_graph_path_matches_eager_loop(
    case: str,
    device: str,
    tmp_path: Path,
    eagle3_helpers: ModuleType,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The context forward on the static buffers of ``DraftContextGraphs`` (queries padded to
    one length, padded batch) and steps 2..k on those of ``DraftStepGraphs`` (one read at the
    end; captured and replayed as CUDA graphs on a GPU, float32 there) draft exactly what the
    eager loop drafts, over rounds with a rollback; rounds they cannot take (mixed k) fall back
    to the loop."""
    h = eagle3_helpers
    kind, layers, model_type, bias, extra = h.REF_CASES[case]
    cfg = h.layer_config(kind, layers=layers, attention_bias=bias, rope_theta=10000.0)
    flags = {"norm_before_residual": True, "norm_output": False, **extra}
    kept = torch.arange(0, h.VT, 2) if "d2t" in case else None
    t = h.random_tensors(
        cfg, num_aux=2, kept=kept, norm_before_fc=flags.get("norm_before_fc", False)
    )
    ckpt = h.write_checkpoint(
        tmp_path / "d", t, cfg, model_type=model_type, aux_ids=[2, 1],
        draft_vocab=h.VT if kept is None else len(kept), dtype=h.F64, **flags,
    )  # fmt: skip
    eager, graphed = _eager_and_graphed(h, ckpt, device, monkeypatch)
    assert eager.step_graphs is None
    assert (graphed.step_graphs is not None) == (device == "cuda")
    steps = DraftStepGraphs(
        graphed.runner,
        graphed.model,
        batch_sizes=[1, 2, 4],
        max_steps=6,
        capture=device == "cuda",
    )
    graphed.step_graphs = steps
    contexts = DraftContextGraphs(
        graphed.runner,
        graphed.model,
        batch_sizes=[1, 2, 4],
        max_query_len=5,
        rows=1,
        capture=device == "cuda",
    )
    graphed.context_graphs = contexts
    g = torch.Generator().manual_seed(5)
    x = torch.randint(0, h.VT, (3, 24), generator=g).tolist()
    aux = torch.randn(3, 24, 2 * h.H, generator=g, dtype=h.F64).to(device)
    rounds = [  # (seq, start, end, k)
        [(0, 0, 6, 4), (1, 0, 3, 4), (2, 0, 5, 4)],  # 3 sequences: padded to 4
        [(0, 6, 8, 4), (1, 3, 6, 4), (2, 5, 6, 4)],
        [(0, 5, 9, 3), (1, 6, 7, 1), (2, 6, 7, 3)],  # mixed k: the eager loop
        [(0, 9, 10, 6), (2, 7, 9, 6)],  # seq 0 rolled back above, two sequences: padded to 2
    ]
    _same_drafts(eager, graphed, rounds, x, aux, "sequential")
    assert steps.num_replays == 3
    assert contexts.num_replays == 3  # NOTE: the mixed-k round runs its context eagerly too
    assert steps.disabled_reason is None and contexts.disabled_reason is None


@pytest.mark.parametrize(
    "device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, _CUDA])], ids=str
)
def test_parallel_context_graph_matches_eager_forward(
    device: str, tmp_path: Path, eagle3_helpers: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    """P-EAGLE's one forward (confirmed tokens + k - 1 mask slots per sequence) through
    ``DraftContextGraphs`` drafts what the eager forward drafts, with k changing from round to
    round (fewer rows than the graph picks), ragged contexts, a padded batch and a rollback; a
    context longer than the graphs take (the prefill) runs eagerly."""
    h = eagle3_helpers
    kind, layers, model_type, bias, extra = h.REF_CASES["llama-peagle-fc_norm"]
    cfg = h.layer_config(kind, layers=layers, attention_bias=bias, rope_theta=10000.0)
    flags = {"norm_before_residual": True, "norm_output": False, **extra}
    t = h.random_tensors(cfg, num_aux=2, peagle=True, fc_norm=flags.get("fc_norm", False))
    ckpt = h.write_checkpoint(
        tmp_path / "d", t, cfg, model_type=model_type, aux_ids=[2, 1], draft_vocab=h.VT,
        dtype=h.F64, **flags,
    )  # fmt: skip
    eager, graphed = _eager_and_graphed(h, ckpt, device, monkeypatch)
    assert eager.context_graphs is None
    contexts = DraftContextGraphs(
        graphed.runner,
        graphed.model,
        batch_sizes=[1, 2, 4],
        max_query_len=8,
        rows=4,
        capture=device == "cuda",
    )
    graphed.context_graphs = contexts
    g = torch.Generator().manual_seed(9)
    x = torch.randint(0, h.VT, (3, 30), generator=g).tolist()
    aux = torch.randn(3, 30, 2 * h.H, generator=g, dtype=h.F64).to(device)
    rounds = [  # (seq, start, end, k)
        [(0, 0, 12, 4), (1, 0, 9, 4), (2, 0, 10, 4)],  # prefills: longer than the graphs take
        [(0, 12, 15, 4), (1, 9, 10, 4), (2, 10, 15, 4)],  # 3 sequences: padded to 4
        [(0, 15, 17, 2), (1, 10, 12, 2), (2, 15, 16, 2)],  # k = 2: two of the four rows
        [(0, 14, 16, 3), (2, 16, 20, 3)],  # seq 0 rolled back, two sequences
        [(0, 16, 17, 1), (2, 20, 21, 1)],  # k = 1: no mask slots
    ]
    _same_drafts(eager, graphed, rounds, x, aux, "parallel")
    assert contexts.num_replays == 4 and contexts.disabled_reason is None


def _eager_and_graphed(
    h: ModuleType, ckpt: Path, device: str, monkeypatch: pytest.MonkeyPatch
) -> tuple[Any, Any]:
    """The drafter with its graphs off, and as built by default (on CUDA: graphs on; float64 on
    the CPU, float32 on the GPU)."""
    dtype = "float64" if device == "cpu" else "float32"
    with monkeypatch.context() as m:
        m.setenv("OUTRIDER_DRAFT_GRAPHS", "0")
        eager = h._proposer(ckpt, dtype=dtype, device=device)
    # NOTE: on by default on CUDA (the eager loop only where capture is impossible).
    return eager, h._proposer(ckpt, dtype=dtype, device=device)


def _same_drafts(
    eager: Any,
    graphed: Any,
    rounds: list[list[tuple[int, int, int, int]]],
    x: list[list[int]],
    aux: torch.Tensor,  # [seqs, positions, aux width]
    mode: DraftMode,
) -> None:
    """Each round (seq, start, end, k) drafts the same tokens through both proposers and
    leaves them the same KV blocks; releasing every sequence frees them all."""
    params = SamplingParams(temperature=0.0)
    for batch in rounds:
        items = [
            ProposeItem(
                Delta(s, a, x[s][a:e]), k, aux[s, max(a - 1, 0) : e - 1], params if a == 0 else None
            )
            for s, a, e, k in batch
        ]
        want = eager.propose(items, mode)
        got = graphed.propose(items, mode)
        assert got.draft_token_ids == want.draft_token_ids
        assert [len(d) for d in got.draft_token_ids] == [k for *_, k in batch]
        assert graphed.runner.kv.num_used_blocks == eager.runner.kv.num_used_blocks
    for prop in (eager, graphed):
        prop.release([0, 1, 2])
        assert prop.runner.kv.num_used_blocks == 0


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("case", ["llama-peagle-fc_norm", "llama-eagle3"])
def test_drafter_on_second_gpu_runs_its_kernels_there(
    case: str, tmp_path: Path, eagle3_helpers: ModuleType
) -> None:
    """A drafter on cuda:1 while cuda:0 is current loads (P-EAGLE fuses its mask hidden state
    at load) and drafts with every projection forced through the Triton skinny GEMM, which
    launches on the current device: the worker makes its own device current for both."""
    h = eagle3_helpers
    kind, layers, model_type, bias, extra = h.REF_CASES[case]
    cfg = h.layer_config(kind, layers=layers, attention_bias=bias, rope_theta=10000.0)
    flags = {"norm_before_residual": True, "norm_output": False, **extra}
    t = h.random_tensors(
        cfg, num_aux=2, peagle=model_type == "peagle", fc_norm=flags.get("fc_norm", False)
    )
    ckpt = h.write_checkpoint(
        tmp_path / "d", t, cfg, model_type=model_type, aux_ids=[2, 1], draft_vocab=h.VT,
        dtype=h.F64, **flags,
    )  # fmt: skip
    assert torch.cuda.current_device() == 0
    g = torch.Generator().manual_seed(7)
    x = torch.randint(0, h.VT, (2, 12), generator=g).tolist()
    aux = torch.randn(2, 12, 2 * h.H, generator=g, dtype=h.F64).to("cuda:0")
    params = SamplingParams(temperature=0.0)
    with skinny_table.forced(skinny_table.SkinnyConfig(16, 32)):
        prop = h._proposer(ckpt, dtype="float32", device="cuda:1")
        assert prop.runner.device == torch.device("cuda:1")
        items = [ProposeItem(Delta(s, 0, x[s][:8]), 4, aux[s, :7], params) for s in (0, 1)]
        mode = "parallel" if model_type == "peagle" else "sequential"
        res = prop.propose(items, mode)
    assert [len(d) for d in res.draft_token_ids] == [4, 4]
    assert all(0 <= tok < h.VT for d in res.draft_token_ids for tok in d)
