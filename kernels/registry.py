"""Backend registry: every kernel family registers named backends; ``auto`` picks by device.

A backend is registered with a lazy loader (so optional packages such as triton or flashinfer
are imported only when chosen) and a probe that says why it cannot run on a given device,
dtype and quantization. ``resolve`` turns a requested name into a runnable one or raises
``BackendError`` naming the backend, the device and the choices that would run.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from typing import Any

import torch

KINDS = ("attention", "moe", "sampling")


class BackendError(ValueError):
    """A requested backend cannot run where it was asked to."""


@dataclass(frozen=True)
class BackendSpec:
    kind: str
    name: str
    module: str  # import path of the module holding the backend object
    attr: str  # attribute of that module: the backend object
    device_types: tuple[str, ...]  # "cpu", "cuda"
    dtypes: tuple[torch.dtype, ...] | None = None  # None = any floating dtype
    quantizations: tuple[str, ...] = ("none",)
    requires: tuple[str, ...] = ()  # importable packages the backend needs
    min_capability: tuple[int, int] | None = None  # oldest CUDA compute capability it runs on

    def unavailable_reason(
        self, device: torch.device, dtype: torch.dtype, quantization: str
    ) -> str | None:
        if device.type not in self.device_types:
            return f"runs on {'/'.join(self.device_types)} only"
        if self.dtypes is not None and dtype not in self.dtypes:
            names = ", ".join(str(d).removeprefix("torch.") for d in self.dtypes)
            return f"supports dtypes {names} only"
        if quantization not in self.quantizations:
            return f"supports quantization {', '.join(self.quantizations)} only"
        for pkg in self.requires:
            if importlib.util.find_spec(pkg) is None:
                return f"needs the `{pkg}` package, which is not installed"
        if self.min_capability is not None:
            cap = _device_capability(device)
            if cap is not None and cap < self.min_capability:
                need = ".".join(map(str, self.min_capability))
                return f"needs compute capability {need} or newer, this GPU has {cap[0]}.{cap[1]}"
        try:
            found = importlib.util.find_spec(self.module) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            return "is not part of this build of outrider"
        return None


def _device_capability(device: torch.device) -> tuple[int, int] | None:
    """The GPU's compute capability; None where it cannot be read (no CUDA here)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_capability(device)


_REGISTRY: dict[str, dict[str, BackendSpec]] = {kind: {} for kind in KINDS}
# Preference order of `auto`, per kind and device type.
_AUTO_ORDER: dict[str, dict[str, tuple[str, ...]]] = {
    "attention": {"cuda": ("flashinfer", "triton", "torch"), "cpu": ("torch",)},
    # NOTE: torch_loop is last: the only CPU backend that takes fp8 weights (it dequantizes).
    "moe": {
        "cuda": ("flashinfer_cutlass", "triton", "torch", "torch_loop"),
        "cpu": ("torch", "torch_loop"),
    },
    "sampling": {"cuda": ("triton", "torch"), "cpu": ("torch",)},
}


def register(spec: BackendSpec) -> None:
    if spec.kind not in _REGISTRY:
        raise ValueError(f"unknown backend kind {spec.kind!r}; kinds: {', '.join(KINDS)}")
    _REGISTRY[spec.kind][spec.name] = spec


def names(kind: str) -> list[str]:
    return ["auto", *_REGISTRY[kind]]


def runnable(
    kind: str, device: torch.device | str, dtype: torch.dtype, quantization: str = "none"
) -> list[str]:
    dev = torch.device(device)
    return [
        name
        for name, spec in _REGISTRY[kind].items()
        if spec.unavailable_reason(dev, dtype, quantization) is None
    ]


def resolve(
    kind: str,
    requested: str | None,
    device: torch.device | str,
    dtype: torch.dtype,
    quantization: str = "none",
    setting: str | None = None,
) -> str:
    """Return the backend name that will run; ``None`` and ``"auto"`` select by preference."""
    dev = torch.device(device)
    setting = setting or f"{kind}_backend"
    if requested in (None, "auto"):
        for name in _AUTO_ORDER[kind].get(dev.type, ("torch",)):
            spec = _REGISTRY[kind].get(name)
            if spec is not None and spec.unavailable_reason(dev, dtype, quantization) is None:
                return name
        raise BackendError(
            f"no {kind} backend runs on {dev.type} with {dtype} and quantization "
            f"{quantization}; registered: {', '.join(_REGISTRY[kind]) or 'none'}"
        )
    spec = _REGISTRY[kind].get(requested)
    ok = runnable(kind, dev, dtype, quantization)
    if spec is None:
        raise BackendError(
            f"`{setting}` {requested!r} is not a known {kind} backend; "
            f"choices: {', '.join(names(kind))}"
        )
    reason = spec.unavailable_reason(dev, dtype, quantization)
    if reason is not None:
        raise BackendError(
            f"`{setting}` {requested!r} cannot run on device {dev.type} "
            f"({str(dtype).removeprefix('torch.')}, quantization {quantization}): it {reason}; "
            f"choices here: {', '.join(['auto', *ok])}"
        )
    return requested


def get(kind: str, name: str) -> Any:
    """Import and return the backend object registered as ``name``."""
    spec = _REGISTRY[kind].get(name)
    if spec is None:
        raise BackendError(f"unknown {kind} backend {name!r}; choices: {', '.join(names(kind))}")
    return getattr(importlib.import_module(spec.module), spec.attr)


def _register_builtins() -> None:
    cpu_cuda = ("cpu", "cuda")
    half = (torch.float16, torch.bfloat16)
    register(
        BackendSpec(
            "attention", "torch", "outrider.kernels.attention.torch_ref", "BACKEND", cpu_cuda
        )
    )
    register(
        BackendSpec(
            "attention",
            "triton",
            "outrider.kernels.attention.triton_attn",
            "BACKEND",
            ("cuda",),
            half + (torch.float32,),
            requires=("triton",),
        )
    )
    register(
        BackendSpec(
            "attention",
            "flashinfer",
            "outrider.kernels.attention.flashinfer_attn",
            "BACKEND",
            ("cuda",),
            half,
            # NOTE: FlashInfer attends; the KV write is Triton's reshape_and_cache.
            requires=("flashinfer", "triton"),
        )
    )
    for name, attr, quants in (
        ("torch", "BACKEND", ("none",)),
        ("torch_loop", "LOOP_BACKEND", ("none", "fp8")),
    ):
        register(
            BackendSpec(
                "moe", name, "outrider.kernels.moe.torch_ref", attr, cpu_cuda, quantizations=quants
            )
        )
    register(
        BackendSpec(
            "moe",
            "triton",
            "outrider.kernels.moe.triton_moe",
            "BACKEND",
            ("cuda",),
            half + (torch.float32,),
            quantizations=("none", "fp8"),
            requires=("triton",),
        )
    )
    register(
        BackendSpec(
            "moe",
            "flashinfer_cutlass",
            "outrider.kernels.moe.flashinfer_moe",
            "BACKEND",
            ("cuda",),
            (torch.bfloat16,),
            requires=("flashinfer",),
            # NOTE: FlashInfer builds its CUTLASS MoE module for sm89, sm90 and sm100+ only.
            min_capability=(8, 9),
        )
    )
    register(
        BackendSpec("sampling", "torch", "outrider.kernels.sampling.torch_ref", "BACKEND", cpu_cuda)
    )
    register(
        BackendSpec(
            "sampling",
            "triton",
            "outrider.kernels.sampling.triton_rejection",
            "BACKEND",
            ("cuda",),
            requires=("triton",),
        )
    )


_register_builtins()
