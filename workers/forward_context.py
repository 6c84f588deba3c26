"""The state one forward pass shares with every layer: attention metadata, KV caches, backends.

The runner sets it around each forward (``with forward_context(...)``) so model files stay free
of plumbing, as in nano-vllm.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from outrider.kernels.attention.metadata import AttentionMetadata


@dataclass
class ForwardContext:
    attn_metadata: AttentionMetadata
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]]  # per local layer: ([N, bs, nKV, hd]) x2
    attn_backend: Any


_CTX: ForwardContext | None = None


def get_forward_context() -> ForwardContext:
    if _CTX is None:
        raise RuntimeError("no forward context: call the model through ModelRunner")
    return _CTX


@contextmanager
def forward_context(ctx: ForwardContext) -> Iterator[ForwardContext]:
    global _CTX
    # NOTE: per-forward work a backend shares across layers (FlashInfer's page lists) happens
    # here, once, before any layer runs; backends without a `begin_forward` have none.
    begin = getattr(ctx.attn_backend, "begin_forward", None)
    if begin is not None:
        begin(ctx.attn_metadata, ctx.kv_caches)
    prev, _CTX = _CTX, ctx
    try:
        yield ctx
    finally:
        _CTX = prev
