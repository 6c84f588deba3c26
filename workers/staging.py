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

# NOTE: every part starts 16 bytes into its buffer from the last: Triton specialises a kernel on
# whether each pointer argument is 16-byte aligned, so a part at an odd int64 offset (set by the
# lengths of the parts before it) would compile another variant of every kernel that reads it,
# mid-request.
_ALIGN = 2  # int64 elements


def to_device_ints(rows: Sequence[Sequence[int]], device: torch.device) -> list[torch.Tensor]:
    """Each list of ints as an int64 tensor on ``device`` (16-byte aligned views of one buffer,
    one copy)."""
    flat: list[int] = []
    spans = []
    for r in rows:
        start = len(flat)
        flat.extend(r)
        spans.append((start, len(flat)))
        flat.extend(itertools.repeat(0, -len(flat) % _ALIGN))
    if device.type != "cuda":
        buf = torch.tensor(flat, dtype=torch.int64, device=device)
    else:
        buf = torch.tensor(flat, dtype=torch.int64, pin_memory=True).to(device, non_blocking=True)
    return [buf[a:b] for a, b in spans]


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
