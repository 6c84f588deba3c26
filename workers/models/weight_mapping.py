"""Checkpoint tensor names → outrider parameter names (vLLM's stacked-params mapping).

HF checkpoints store q/k/v, gate/up and every expert as separate tensors; outrider merges them
into ``qkv_proj``, ``gate_up_proj`` and the fused ``experts.w13_weight`` / ``w2_weight``. A
routed name carries the shard id (and expert id) the parameter's ``weight_loader`` needs.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from outrider.workers.layers.linear import default_weight_loader
from outrider.workers.layers.moe import EXPERT_SHARD_IDS

# (merged param, checkpoint name, shard id)
STACKED_PARAMS: tuple[tuple[str, str, str | int], ...] = (
    ("qkv_proj", "q_proj", "q"),
    ("qkv_proj", "k_proj", "k"),
    ("qkv_proj", "v_proj", "v"),
    ("gate_up_proj", "gate_proj", 0),
    ("gate_up_proj", "up_proj", 1),
)
_PER_EXPERT = re.compile(r"\.experts\.(\d+)\.(gate_proj|up_proj|down_proj|w1|w2|w3)\.weight$")
_STACKED_EXPERTS = re.compile(r"\.experts\.(gate_up_proj|down_proj)$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


@dataclass(frozen=True)
class RoutedWeight:
    param_name: str
    shard_id: str | int | None = None
    expert_id: int | None = None
    is_expert: bool = False


def layer_index(name: str) -> int | None:
    m = _LAYER.match(name)
    return int(m.group(1)) if m else None


def route(name: str) -> RoutedWeight:
    m = _PER_EXPERT.search(name)
    if m:
        shard = EXPERT_SHARD_IDS[m.group(2)]
        param = "w2_weight" if shard == "w2" else "w13_weight"
        return RoutedWeight(name[: m.start()] + f".experts.{param}", shard, int(m.group(1)), True)
    m = _STACKED_EXPERTS.search(name)
    if m:
        shard = "w13" if m.group(1) == "gate_up_proj" else "w2"
        return RoutedWeight(name[: m.start()] + f".experts.{shard}_weight", shard, None, True)
    for merged, ckpt, shard_id in STACKED_PARAMS:
        if f".{ckpt}." in name:
            return RoutedWeight(name.replace(f".{ckpt}.", f".{merged}."), shard_id)
    return RoutedWeight(name)


def load_routed(
    params: dict[str, nn.Parameter], routed: RoutedWeight, weight: torch.Tensor
) -> None:
    param = params[routed.param_name]
    loader = getattr(param, "weight_loader", None)
    if routed.is_expert:
        loader(param, weight, routed.shard_id, routed.expert_id)
    elif loader is None:
        default_weight_loader(param, weight)
    elif routed.shard_id is None:
        loader(param, weight)
    else:
        loader(param, weight, routed.shard_id)


def unexpected(names: Iterable[str], limit: int = 5) -> str:
    names = sorted(names)
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
