"""The drafter `outrider serve` and `outrider generate` use for the embedded model by default.

The heads shipped under ``drafters/smollm2-135m-instruct`` were measured on the same prompts;
``selection.json`` there records tokens/s per method on the CPU and, under ``cuda``, on a GPU
(machine and command included). The default is the fastest method, as measured on the kind of
device this machine has, that the drafter group can run as trained: P-EAGLE and DFlash only
count when the group can draft in parallel (pipeline_parallel_size 1), otherwise EAGLE-3.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SHIPPED_TARGET = "smollm2-135m-instruct"
PARALLEL_METHODS = ("peagle", "dflash")


def shipped_dir() -> Path:
    import outrider.drafters

    return Path(next(iter(outrider.drafters.__path__))) / SHIPPED_TARGET


def shipped_drafters() -> dict[str, Path]:
    """``{method: checkpoint dir}`` of the heads shipped for the embedded model."""
    root = shipped_dir()
    return (
        {
            d.name: d
            for d in sorted(root.iterdir())
            if d.is_dir() and (d / "config.json").is_file() and (d / "model.safetensors").is_file()
        }
        if root.is_dir()
        else {}
    )


def measured_tokens_per_s(device: str = "cpu") -> dict[str, float]:
    """Measured tokens/s per method (and ``plain``) on ``device`` ("cpu" or "cuda")."""
    path = shipped_dir() / "selection.json"
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    table = data.get("tokens_per_s", {}) if device == "cpu" else data.get(device, {})
    if device != "cpu":
        table = table.get("tokens_per_s", {})
    return {str(k): float(v) for k, v in table.items()}


def local_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def choose_method(can_draft_in_parallel: bool, device: str = "cpu") -> str | None:
    heads = shipped_drafters()
    eligible = [m for m in heads if can_draft_in_parallel or m not in PARALLEL_METHODS]
    if not eligible:
        return None
    speed = measured_tokens_per_s(device) or measured_tokens_per_s("cpu")
    return max(eligible, key=lambda m: (speed.get(m, 0.0), m == "eagle3"))


def default_speculative(
    pipeline_parallel_size: int = 1, device: str | None = None
) -> dict[str, Any] | None:
    """The ``speculative`` section for the embedded target, or None if no head is shipped.
    ``device`` picks whose measurements decide (default: "cuda" if this machine has a GPU)."""
    method = choose_method(
        can_draft_in_parallel=pipeline_parallel_size == 1, device=device or local_device()
    )
    if method is None:
        return None
    out: dict[str, Any] = {
        "model": str(shipped_drafters()[method]),
        "num_speculative_tokens": 4,
        "pipeline_parallel_size": pipeline_parallel_size,
    }
    return out
