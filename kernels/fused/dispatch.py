"""When the layers route a tensor through the fused Triton kernels instead of their torch code.

The kernels run for CUDA tensors of float16, bfloat16 or float32 when ``triton`` imports;
everything else (CPU, float64, tensors that require grad, no triton) keeps the layers' torch
code unchanged.
``fused_on_cpu()`` also routes CPU tensors through them, for tests under the Triton interpreter
(``TRITON_INTERPRET=1``), so that the layer wiring is exercised without a GPU.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from collections.abc import Iterator

import torch

FUSED_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32})

_cpu_interpreter = False


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def use_fused(x: torch.Tensor) -> bool:
    """True when ``x`` goes through the fused kernels (host-side checks only: no sync)."""
    if not (x.is_cuda or (_cpu_interpreter and x.device.type == "cpu")):
        return False
    # NOTE: the kernels have no backward; anything autograd tracks keeps the torch code.
    return x.dtype in FUSED_DTYPES and not x.requires_grad and triton_available()


@contextlib.contextmanager
def fused_on_cpu() -> Iterator[None]:
    """Route CPU tensors through the fused kernels as well (Triton interpreter only)."""
    global _cpu_interpreter
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("fused_on_cpu() needs the Triton interpreter (TRITON_INTERPRET=1)")
    previous, _cpu_interpreter = _cpu_interpreter, True
    try:
        yield
    finally:
        _cpu_interpreter = previous


@functools.cache
def _pdl_capable(index: int) -> bool:
    return torch.cuda.get_device_capability(index) >= (9, 0)


def pdl(x: torch.Tensor) -> bool:
    """Launch the decode-path kernels on ``x``'s device with programmatic dependent launch.

    On Hopper and newer a kernel launched this way may start while the one before it in the
    stream is still running; it calls ``griddepcontrol.wait`` before it reads or writes anything
    (kernels/fused/pdl.py), so only the launch latency and the ramp-up overlap, never the work.
    Off for CPU tensors (the interpreter), before sm90, and with ``OUTRIDER_PDL=0``.
    """
    if not x.is_cuda or os.environ.get("OUTRIDER_PDL", "1") == "0":
        return False
    index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    return _pdl_capable(index)
