"""Kernel tests run on CUDA, or on CPU tensors through the Triton interpreter when
``OUTRIDER_TRITON_INTERPRET=1`` (small shapes; see tests/gpu/README.md)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# NOTE: tests/conftest.py sets TRITON_INTERPRET=1 for this mode before triton is imported.
INTERPRET = os.environ.get("OUTRIDER_TRITON_INTERPRET") == "1"


if INTERPRET:
    from outrider.kernels.interpreter import patch_numpy_index

    patch_numpy_index()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-layer Llama (vocab 512) with N(0, 0.08) weights, saved as an HF folder."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=512,
        hidden_size=256,
        num_attention_heads=8,
        num_key_value_heads=2,
        intermediate_size=512,
        num_hidden_layers=4,
        max_position_embeddings=1024,
    )
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.08)
    path = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(path)
    return path
