"""Timers for GPU benchmarks: CUDA-event medians, CUDA-graph replays, device figures.

On a CPU device (the smoke test of ``outrider bench-kernels``) the timers fall back to wall
clock and nothing is captured.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

COPY_BYTES = 1 << 30
GEMM_N = 8192


def median_ms(
    fn: Callable[[], Any], device: Any, *, reps: int = 15, sample_ms: float = 5.0
) -> float:
    """Median milliseconds per call; each sample times enough back-to-back calls to last about
    ``sample_ms`` (between two CUDA events on a GPU)."""
    if torch.device(device).type != "cuda":
        fn()
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    inner = max(1, math.ceil(sample_ms / max(start.elapsed_time(end), 1e-3)))
    samples = []
    for _ in range(reps):
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / inner)
    return statistics.median(samples)


def capture(fn: Callable[[], Any]) -> Callable[[], None]:
    """A CUDA graph of ``fn`` on the current device (``workers.cuda_graph.capture_graph``);
    returns its replay."""
    from outrider.workers.cuda_graph import capture_graph

    graph, _ = capture_graph(fn, torch.device("cuda", torch.cuda.current_device()))
    return graph.replay


def time_calls(calls: list[Callable[[], Any]], graph: bool, device: Any) -> float:
    """Median ms per call of one pass over ``calls`` (one graph holding them all, or eager)."""

    def run_all() -> None:
        for c in calls:
            c()

    return median_ms(capture(run_all) if graph else run_all, device) / len(calls)


def copy_bandwidth() -> float:
    """Bytes per second of a 1 GiB device-to-device copy, bytes read plus written."""
    src = torch.empty(COPY_BYTES, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), "cuda", reps=10, sample_ms=20.0)
    return 2 * COPY_BYTES / (ms * 1e-3)


def matmul_rate() -> float:
    """FLOP/s of a bf16 ``8192 x 8192 x 8192`` GEMM."""
    a = torch.randn(GEMM_N, GEMM_N, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(GEMM_N, GEMM_N, device="cuda", dtype=torch.bfloat16)
    c = torch.empty_like(a)
    ms = median_ms(lambda: torch.matmul(a, b, out=c), "cuda", reps=10, sample_ms=20.0)
    return 2.0 * GEMM_N**3 / (ms * 1e-3)


def count_kernels(fn: Callable[[], Any], device: Any) -> int | None:
    """Device kernels and copies one eager call launches (torch profiler); None if unknown."""
    if torch.device(device).type != "cuda":
        return None
    try:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        count = sum(1 for e in prof.events() if e.device_type == DeviceType.CUDA)
    except (RuntimeError, AssertionError):
        return None
    return count or None


def kernel_times(
    fn: Callable[[], Any], device: Any, *, calls: int = 20
) -> list[tuple[str, float, float]]:
    """Per kernel name: ``(name, us per call, launches per call)`` over ``calls`` calls of ``fn``
    (kernels inside CUDA-graph replays included), slowest first; empty when unknown."""
    if torch.device(device).type != "cuda":
        return []
    fn()
    torch.cuda.synchronize()
    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(calls):
                fn()
            torch.cuda.synchronize()
    except (RuntimeError, AssertionError):
        return []
    totals: dict[str, list[float]] = {}
    for e in prof.events():
        if e.device_type != DeviceType.CUDA:
            continue
        agg = totals.setdefault(e.name, [0.0, 0.0])
        agg[0] += e.time_range.elapsed_us()
        agg[1] += 1
    rows = [(name, t / calls, n / calls) for name, (t, n) in totals.items()]
    return sorted(rows, key=lambda r: -r[1])


def format_kernel_times(rows: list[tuple[str, float, float]], top: int = 12) -> list[str]:
    """Lines ``us/call  launches  name`` for the ``top`` slowest kernels, then their sum."""
    total = sum(r[1] for r in rows)
    lines = [f"    {us:9.1f} us {n:6.1f}x  {name[:90]}" for name, us, n in rows[:top]]
    lines.append(f"    {total:9.1f} us in {sum(r[2] for r in rows):.0f} kernels (device time)")
    return lines


def graph_safe(backend: Any) -> bool:
    return bool(getattr(backend, "cuda_graph_safe", False))
