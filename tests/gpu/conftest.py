"""Kernel tests run on CUDA, or on CPU tensors through the Triton interpreter when
``OUTRIDER_TRITON_INTERPRET=1`` (small shapes; see tests/gpu/README.md)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest
import torch

# NOTE: tests/conftest.py sets TRITON_INTERPRET=1 for this mode before triton is imported.
INTERPRET = os.environ.get("OUTRIDER_TRITON_INTERPRET") == "1"


T = TypeVar("T")

if INTERPRET:
    from outrider.kernels.interpreter import patch_numpy_index

    patch_numpy_index()


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``tiny_llama(name, **dims) -> path``: a Llama (vocab 512, 1024 positions; by default
    hidden 256, 8 heads / 2 KV heads, intermediate 512, 4 layers) with N(0, 0.08) weights from
    seed 0, saved as an HF folder."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    def make(name: str = "tiny", **dims: int) -> Path:
        torch.manual_seed(0)
        shape = dict(
            hidden_size=256,
            num_attention_heads=8,
            num_key_value_heads=2,
            intermediate_size=512,
            num_hidden_layers=4,
        )
        cfg = LlamaConfig(vocab_size=512, max_position_embeddings=1024, **{**shape, **dims})
        model = AutoModelForCausalLM.from_config(cfg)
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() > 1:
                    p.normal_(0.0, 0.08)
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path)
        return path

    return make


@pytest.fixture(scope="session")
def tiny_dir(tiny_llama: Callable[..., Path]) -> Path:
    """The default ``tiny_llama`` (4 layers, vocab 512)."""
    return tiny_llama()


def _capture_step(step: Callable[[], T]) -> tuple[torch.cuda.CUDAGraph, T]:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    return graph, captured


@pytest.fixture
def capture_step() -> Callable[[Callable[[], T]], tuple[torch.cuda.CUDAGraph, T]]:
    """``capture_step(step)``: ``step`` run once on a side stream (compiles outside the
    capture), then captured in a CUDA graph; returns the graph and the captured call's outputs
    (rewritten by each replay)."""
    return _capture_step
