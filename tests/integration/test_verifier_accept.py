"""The verifier's host-side greedy acceptance against its device-tensor path.

An all-greedy batch reads the target's argmax tokens once and accepts on the host; mixed batches
take the tensor path. Both must give the same tokens and counts for the same logits (strict
comparison), and for the same synthetic draws (synthetic acceptance).
"""

from __future__ import annotations

import copy

import pytest
import torch

from outrider.workers.config import CacheConfig, ModelConfig, SamplingParams, WorkerConfig
from outrider.workers.protocol import Delta
from outrider.workers.runner import ModelRunner
from outrider.workers.staging import as_range, select_rows, to_device_ints
from outrider.workers.verifier import Verifier, VerifyItem

VOCAB = 96


def _runner(path: object) -> ModelRunner:
    return ModelRunner(
        WorkerConfig(
            model=ModelConfig(path=str(path), dtype="float32"),
            cache=CacheConfig(block_size=4, num_blocks=64),
        ),
        group="target",
    )


def _batch(
    gen: torch.Generator, ks: list[int], hit: float
) -> tuple[list[VerifyItem], torch.Tensor]:
    """Items with drafts that often equal the logits' argmax, and those logits."""
    rows = sum(k + 1 for k in ks)
    logits = torch.randn(rows, VOCAB, generator=gen)  # [sum(k_b + 1), V]
    top = logits.argmax(dim=-1).tolist()
    items, off = [], 0
    for s, k in enumerate(ks):
        drafts = [
            top[off + j] if torch.rand((), generator=gen) < hit else (top[off + j] + 1) % VOCAB
            for j in range(k)
        ]
        off += k + 1
        params = SamplingParams(temperature=0.0, max_tokens=8)
        items.append(VerifyItem(Delta(s, 0, [1, 2]), drafts, None, params))
    return items, logits


@pytest.mark.parametrize("verification", ["strict", "probabilistic", "synthetic"])
def test_greedy_host_acceptance_equals_the_tensor_path(tiny_model, verification: str) -> None:  # type: ignore[no-untyped-def]
    path, _ = tiny_model("llama")
    rates = [0.9, 0.6, 0.3, 0.1] if verification == "synthetic" else None
    verifier = Verifier(_runner(path), verification=verification, synthetic_rates=rates)  # type: ignore[arg-type]
    gen = torch.Generator().manual_seed(0)
    for trial in range(40):
        ks = torch.randint(0, 5, (1 + trial % 6,), generator=gen).tolist()
        items, logits = _batch(gen, ks, hit=0.8)
        params = [verifier._register(it) for it in items]
        # NOTE: both paths draw the synthetic uniforms from the same per-sequence streams.
        saved = copy.deepcopy(verifier._synthetic_gens)
        host = verifier._accept_greedy(items, ks, logits)
        verifier._synthetic_gens = saved
        tensors = verifier._accept_tensors(items, params, ks, logits)
        assert host == tensors, (trial, ks)
        verifier.release([it.delta.seq_id for it in items])


def test_staging_helpers() -> None:
    a, b, c = to_device_ints([[1, 2, 3], [], [7]], torch.device("cpu"))
    assert a.tolist() == [1, 2, 3] and b.tolist() == [] and c.tolist() == [7]
    assert a.dtype == torch.int64
    # every part 16-byte aligned from the first, whatever the lengths before it
    parts = to_device_ints([[1], [2, 3, 4], [5, 6], [7]], torch.device("cpu"))
    assert [p.tolist() for p in parts] == [[1], [2, 3, 4], [5, 6], [7]]
    assert all((p.data_ptr() - parts[0].data_ptr()) % 16 == 0 for p in parts)
    assert as_range([4, 5, 6]) == (4, 7) and as_range([4, 6]) is None and as_range([]) is None
    t = torch.arange(12).view(6, 2)
    assert select_rows(t, [2, 3, 4]).data_ptr() == t[2].data_ptr()  # a view, no gather
    assert select_rows(t, [5, 0, 5]).tolist() == [[10, 11], [0, 1], [10, 11]]
