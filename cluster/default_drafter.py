"""The drafter `outrider serve` and `outrider generate` use for the embedded model by default.

The heads shipped under ``drafters/smollm2-135m-instruct`` were measured on the same prompts;
``selection.json`` there records tokens/s per method (machine and command included). The
default is the fastest method the drafter group can run as trained: P-EAGLE and DFlash only
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


def measured_tokens_per_s() -> dict[str, float]:
    path = shipped_dir() / "selection.json"
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    return {str(k): float(v) for k, v in data.get("tokens_per_s", {}).items()}


def choose_method(can_draft_in_parallel: bool) -> str | None:
    heads = shipped_drafters()
    eligible = [m for m in heads if can_draft_in_parallel or m not in PARALLEL_METHODS]
    if not eligible:
        return None
    speed = measured_tokens_per_s()
    return max(eligible, key=lambda m: (speed.get(m, 0.0), m == "eagle3"))


def default_speculative(pipeline_parallel_size: int = 1) -> dict[str, Any] | None:
    """The ``speculative`` section for the embedded target, or None if no head is shipped."""
    method = choose_method(can_draft_in_parallel=pipeline_parallel_size == 1)
    if method is None:
        return None
    out: dict[str, Any] = {
        "model": str(shipped_drafters()[method]),
        "num_speculative_tokens": 4,
        "pipeline_parallel_size": pipeline_parallel_size,
    }
    return out
