"""Which projections take the skinny GEMM (``skinny_gemm.py``), and with which tiles.

The kernel pays only on some shapes and row counts, so the choice is a table measured per GPU
model (``skinny_gemm_configs/<device>.json``, written by ``benchmarks/gpu_skinny.py``): an entry
is used only where the kernel beat cuBLAS plus the separate prologue launch, or, for an entry
with a ``chain`` record, where it made a whole model step faster (``bench-kernels``: inside the
step, PDL and the launch it saves count; alone they do not). Without a table for
the GPU, every projection stays on cuBLAS. ``OUTRIDER_SKINNY_GEMM=0`` turns the path off;
``OUTRIDER_SKINNY_GEMM_CONFIG=<file>`` reads another table. This module imports no Triton: the
layers ask it on every call, on machines with and without Triton.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch

from outrider.kernels.fused.dispatch import triton_available, use_fused

Prologue = Literal["none", "norm", "add_norm", "silu_mul"]
PROLOGUES: tuple[Prologue, ...] = ("none", "norm", "add_norm", "silu_mul")
MAX_ROWS = 16
_CONFIG_DIR = Path(__file__).with_name("skinny_gemm_configs")


@dataclass(frozen=True)
class SkinnyConfig:
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3


# NOTE: used when a call names no config (tests, the sweep's first guess); tables override.
DEFAULT_CONFIG_ONE_ROW = SkinnyConfig(block_n=16, block_k=256, num_warps=4, num_stages=4)
DEFAULT_CONFIG_ROWS = SkinnyConfig(block_n=32, block_k=128, num_warps=4, num_stages=4)


def row_bucket(m: int) -> int:
    """The table row that covers ``m`` rows: 1, 2, 4, 8 or 16."""
    return 1 if m <= 1 else min(MAX_ROWS, 1 << (m - 1).bit_length())


def table_key(prologue: Prologue, m: int, n: int, k: int) -> str:
    return f"{prologue}:{row_bucket(m)}:{n}:{k}"


def device_slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.strip()).strip("_").lower()


@functools.cache
def _table(device_name: str) -> dict[str, SkinnyConfig]:
    override = os.environ.get("OUTRIDER_SKINNY_GEMM_CONFIG")
    path = Path(override) if override else _CONFIG_DIR / f"{device_slug(device_name)}.json"
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    fields = set(SkinnyConfig.__dataclass_fields__)
    return {
        key: SkinnyConfig(**{f: v for f, v in e["config"].items() if f in fields})
        for key, e in data["entries"].items()
        if e.get("use", True)
    }


@functools.cache
def _device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def enabled() -> bool:
    return os.environ.get("OUTRIDER_SKINNY_GEMM", "1") != "0"


_forced: SkinnyConfig | None = None


@contextlib.contextmanager
def forced(config: SkinnyConfig) -> Iterator[None]:
    """Every call the fused kernels take (``dispatch.use_fused``) of up to 16 rows runs the
    kernel with ``config``, whatever the table says (tests; with ``fused_on_cpu`` on CPU)."""
    global _forced
    previous, _forced = _forced, config
    try:
        yield
    finally:
        _forced = previous


def plan(x: torch.Tensor, weight: torch.Tensor, prologue: Prologue) -> SkinnyConfig | None:
    """The tiles for this call when the table says the kernel wins here, else None (host only)."""
    m = x.shape[0] if x.dim() == 2 else -1
    if _forced is not None:
        ok = 1 <= m <= MAX_ROWS and use_fused(x) and weight.dtype == x.dtype
        return _forced if ok else None
    if not (x.is_cuda and 1 <= m <= MAX_ROWS and enabled()):
        return None
    if x.dtype not in (torch.bfloat16, torch.float16) or weight.dtype != x.dtype:
        return None
    if not triton_available():
        return None
    index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    return _table(_device_name(index)).get(table_key(prologue, m, *weight.shape))


def config_entry(config: SkinnyConfig, **figures: float | bool) -> dict[str, object]:
    """One table entry as ``benchmarks/gpu_skinny.py`` writes it."""
    return {"config": asdict(config), **figures}
