"""The drafter's moe_backend: inherit, override, auto, and an impossible explicit choice."""

from __future__ import annotations

from typing import Any

import pytest

from outrider.cluster.config import OutriderConfig
from outrider.cluster.llm import LLM
from outrider.kernels.registry import BackendError
from outrider.workers.config import (
    CacheConfig,
    KernelConfig,
    ModelConfig,
    SamplingParams,
    WorkerConfig,
)
from outrider.workers.layers.moe import FusedMoE
from outrider.workers.spec_config import SpeculativeConfig


class _CountingKernel:
    """Wraps a layer's MoE kernel to count the calls that reach it."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.name = inner.name
        self.calls = 0

    def __getattr__(self, attr: str) -> Any:
        return getattr(self.inner, attr)

    def fused_moe(self, *args: Any) -> Any:
        self.calls += 1
        return self.inner.fused_moe(*args)


@pytest.mark.parametrize(
    ("target_backend", "drafter_backend", "want_target", "want_drafter"),
    [
        ("torch", None, "torch", "torch"),  # unset: inherit
        ("torch_loop", None, "torch_loop", "torch_loop"),  # unset: inherit
        ("torch", "torch_loop", "torch", "torch_loop"),  # a value: the drafter only
        ("torch_loop", "auto", "torch_loop", "torch"),  # auto: the drafter's own selection
        ("auto", "torch_loop", "torch", "torch_loop"),
    ],
)
def test_moe_backend_table(  # type: ignore[no-untyped-def]
    tiny_model,
    target_backend: str,
    drafter_backend: str | None,
    want_target: str,
    want_drafter: str,
) -> None:
    path, _ = tiny_model("qwen3_moe")
    target = WorkerConfig(
        model=ModelConfig(path=str(path), dtype="float64"),
        kernels=KernelConfig(moe_backend=target_backend),  # type: ignore[arg-type]
        cache=CacheConfig(block_size=4),
    )
    spec = SpeculativeConfig(
        method="draft_model",
        model=str(path),
        num_speculative_tokens=2,
        moe_backend=drafter_backend,  # type: ignore[arg-type]
    )
    llm = LLM(OutriderConfig(target=target, speculative=spec))
    drafter_runner = llm.drafter.runner  # type: ignore[union-attr]
    assert llm.runner.moe_backend == want_target
    assert drafter_runner.moe_backend == want_drafter
    layers = {
        "target": [m for m in llm.runner.model.modules() if isinstance(m, FusedMoE)],
        "drafter": [m for m in drafter_runner.model.modules() if isinstance(m, FusedMoE)],
    }
    for role, want in (("target", want_target), ("drafter", want_drafter)):
        assert layers[role], role
        for layer in layers[role]:
            assert layer.moe_backend == want
            layer.kernel = _CountingKernel(layer.kernel)
    llm.generate([[5, 6, 7, 8]], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    for role, want in (("target", want_target), ("drafter", want_drafter)):
        for layer in layers[role]:
            assert layer.kernel.calls > 0 and layer.kernel.name == want


def test_impossible_drafter_backend_names_group_backend_device_choices(tiny_model) -> None:  # type: ignore[no-untyped-def]
    path, _ = tiny_model("qwen3_moe")
    target = WorkerConfig(model=ModelConfig(path=str(path), dtype="float32"))
    spec = SpeculativeConfig(
        method="draft_model",
        model=str(path),
        num_speculative_tokens=2,
        moe_backend="flashinfer_cutlass",
    )
    with pytest.raises(BackendError) as info:
        LLM(OutriderConfig(target=target, speculative=spec))
    msg = str(info.value)
    for needle in (
        "drafter.moe_backend",
        "flashinfer_cutlass",
        "device cpu",
        "choices here",
        "torch",
        "torch_loop",
    ):
        assert needle in msg, msg
