"""Backend resolution on CUDA with and without the optional packages (no GPU needed: the probes
read package availability and the compute capability, which these tests set)."""

from __future__ import annotations

import importlib.machinery
import importlib.util
from collections.abc import Callable

import pytest
import torch

from outrider.kernels import registry
from outrider.kernels.registry import BackendError

_REAL_FIND_SPEC = importlib.util.find_spec


def _packages(
    monkeypatch: pytest.MonkeyPatch, present: set[str], absent: set[str]
) -> Callable[..., object]:
    """Make ``importlib.util.find_spec`` see ``present`` and miss ``absent``."""

    def find_spec(name: str, package: str | None = None) -> object:
        if name in absent or name.split(".")[0] in absent:
            return None
        if name in present:
            return importlib.machinery.ModuleSpec(name, None)
        return _REAL_FIND_SPEC(name, package)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    return find_spec


def _capability(monkeypatch: pytest.MonkeyPatch, cap: tuple[int, int] | None) -> None:
    monkeypatch.setattr(registry, "_device_capability", lambda device: cap)


TRITON_BUILD = {"triton", "outrider.kernels.moe.triton_moe"}


def test_auto_on_cuda_without_flashinfer_resolves_to_triton(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _packages(monkeypatch, present=TRITON_BUILD, absent={"flashinfer"})
    _capability(monkeypatch, (9, 0))
    for dtype in (torch.bfloat16, torch.float16):
        assert registry.resolve("attention", "auto", "cuda", dtype) == "triton"
        assert registry.resolve("moe", None, "cuda", dtype) == "triton"
    assert registry.resolve("moe", "auto", "cuda", torch.bfloat16, "fp8") == "triton"
    assert "flashinfer" not in registry.runnable("attention", "cuda", torch.bfloat16)


def test_auto_on_cuda_with_flashinfer_prefers_it_where_it_runs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _packages(monkeypatch, present=TRITON_BUILD | {"flashinfer"}, absent=set())
    _capability(monkeypatch, (9, 0))
    assert registry.resolve("attention", "auto", "cuda", torch.bfloat16) == "flashinfer"
    assert registry.resolve("attention", "auto", "cuda", torch.float16) == "flashinfer"
    # float32 attention, float16 / fp8 MoE: flashinfer declines, triton runs
    assert registry.resolve("attention", "auto", "cuda", torch.float32) == "triton"
    assert registry.resolve("moe", "auto", "cuda", torch.bfloat16) == "flashinfer_cutlass"
    assert registry.resolve("moe", "auto", "cuda", torch.float16) == "triton"
    assert registry.resolve("moe", "auto", "cuda", torch.bfloat16, "fp8") == "triton"
    # an sm80 GPU has no CUTLASS MoE module
    _capability(monkeypatch, (8, 0))
    assert registry.resolve("moe", "auto", "cuda", torch.bfloat16) == "triton"


def test_flashinfer_attention_needs_triton_for_its_kv_write(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _packages(monkeypatch, present={"flashinfer"}, absent={"triton"})
    assert registry.resolve("attention", "auto", "cuda", torch.bfloat16) == "torch"
    with pytest.raises(BackendError, match="needs the `triton` package"):
        registry.resolve("attention", "flashinfer", "cuda", torch.bfloat16)


def test_cpu_resolution_is_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    _packages(monkeypatch, present=TRITON_BUILD | {"flashinfer"}, absent=set())
    for dtype in (torch.float32, torch.bfloat16):
        assert registry.resolve("attention", "auto", "cpu", dtype) == "torch"
        assert registry.resolve("moe", "auto", "cpu", dtype) == "torch"
    with pytest.raises(BackendError, match="runs on cuda only"):
        registry.resolve("attention", "flashinfer", "cpu", torch.bfloat16)


@pytest.mark.parametrize(
    ("dtype", "quant", "cap", "absent", "reason"),
    [
        (torch.bfloat16, "none", (9, 0), {"flashinfer"}, "needs the `flashinfer` package"),
        (torch.float16, "none", (9, 0), set(), "supports dtypes bfloat16 only"),
        (torch.bfloat16, "fp8", (9, 0), set(), "supports quantization none only"),
        (torch.bfloat16, "none", (8, 0), set(), "needs compute capability 8.9 or newer"),
    ],
)
def test_flashinfer_cutlass_says_why_it_cannot_run(
    monkeypatch: pytest.MonkeyPatch,
    dtype: torch.dtype,
    quant: str,
    cap: tuple[int, int],
    absent: set[str],
    reason: str,
) -> None:
    _packages(monkeypatch, present=TRITON_BUILD | ({"flashinfer"} - absent), absent=absent)
    _capability(monkeypatch, cap)
    with pytest.raises(BackendError, match=reason) as err:
        registry.resolve("moe", "flashinfer_cutlass", "cuda", dtype, quant)
    assert "`moe_backend` 'flashinfer_cutlass' cannot run on device cuda" in str(err.value)
    assert "triton" in str(err.value).split("choices here:")[1]


def test_capability_is_not_read_without_cuda() -> None:
    assert registry._device_capability(torch.device("cpu")) is None
    if not torch.cuda.is_available():
        assert registry._device_capability(torch.device("cuda")) is None
