"""Host integers to the device without a host sync, and row selections without index copies.

A ``torch.tensor(list, device="cuda")`` is a blocking copy from pageable memory: the host waits
for everything queued on the stream before it can launch the next kernel. A step's metadata is
a handful of such lists; here they go as one pinned buffer and one asynchronous copy, ordered on
the stream before the kernels that read them. (The caching host allocator keeps the pinned
block until its copy has run, so reusing it is safe.)
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch


def to_device_ints(rows: Sequence[Sequence[int]], device: torch.device) -> list[torch.Tensor]:
    """Each list of ints as an int64 tensor on ``device`` (views of one buffer, one copy)."""
    sizes = [len(r) for r in rows]
    flat = list(itertools.chain.from_iterable(rows))
    if device.type != "cuda":
        return list(torch.tensor(flat, dtype=torch.int64, device=device).split(sizes))
    host = torch.tensor(flat, dtype=torch.int64, pin_memory=True)
    return list(host.to(device, non_blocking=True).split(sizes))


def as_range(rows: Sequence[int]) -> tuple[int, int] | None:
    """``(start, stop)`` when ``rows`` are consecutive ascending integers, else None."""
    if not rows:
        return None
    start = rows[0]
    for i, r in enumerate(rows):
        if r != start + i:
            return None
    return start, start + len(rows)


def select_rows(t: torch.Tensor, rows: Sequence[int]) -> torch.Tensor:
    """``t[rows]``: a view when the rows are one run, else a gather with a device index."""
    span = as_range(rows)
    if span is not None:
        return t[span[0] : span[1]]
    (index,) = to_device_ints([rows], t.device)
    return t.index_select(0, index)
