"""Random-weight models at real shapes, built directly on the device (no checkpoint).

For benchmarks: the outrider model class of an HF config is constructed inside
``torch.device(device)`` in the target dtype, so every parameter is allocated where it runs
(an 8B model never exists on the CPU), then filled with ``normal_(0, std)`` by a seeded
generator on that device; norm weights stay 1.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, PretrainedConfig

from outrider.workers.models.loader import default_dtype
from outrider.workers.models.registry import get_model_class

# Llama-3.1-8B (meta-llama/Llama-3.1-8B config.json, the fields outrider reads).
LLAMA_3_1_8B: dict[str, Any] = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    "tie_word_embeddings": False,
}

# Qwen3-30B-A3B (Qwen/Qwen3-30B-A3B config.json): every layer sparse, 128 experts, top 8.
QWEN3_30B_A3B: dict[str, Any] = {
    "model_type": "qwen3_moe",
    "architectures": ["Qwen3MoeForCausalLM"],
    "vocab_size": 151936,
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "moe_intermediate_size": 768,
    "num_hidden_layers": 48,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "norm_topk_prob": True,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "max_position_embeddings": 40960,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": False,
}

SHAPES: dict[str, dict[str, Any]] = {"llama8b": LLAMA_3_1_8B, "qwen3moe": QWEN3_30B_A3B}


def make_hf_config(config: dict[str, Any] | PretrainedConfig, **overrides: Any) -> PretrainedConfig:
    """An HF config object from a config.json-style dict (or a config), with overrides."""
    if isinstance(config, PretrainedConfig):
        data = config.to_dict()
    else:
        data = dict(config)
    data.update(overrides)
    model_type = data.pop("model_type")
    return AutoConfig.for_model(model_type, **data)


@torch.no_grad()
def init_random_(model: nn.Module, *, std: float = 0.02, seed: int = 0) -> None:
    """Fill every parameter with N(0, std²) in place; norm weights become 1."""
    devices = {p.device for p in model.parameters()}
    gens = {d: torch.Generator(device=d).manual_seed(seed) for d in devices}
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        else:
            p.normal_(0.0, std, generator=gens[p.device])


def build_random_model(
    config: dict[str, Any] | PretrainedConfig,
    *,
    device: torch.device | str,
    dtype: torch.dtype,
    moe_backend: str = "torch",
    std: float = 0.02,
    seed: int = 0,
    **overrides: Any,
) -> tuple[nn.Module, PretrainedConfig]:
    """The outrider model of ``config`` (plus overrides, e.g. ``num_hidden_layers=2``) with
    random weights, allocated on ``device`` in ``dtype``."""
    hf_config = make_hf_config(config, **overrides)
    cls = get_model_class(hf_config)
    with default_dtype(dtype), torch.device(device):
        model = cls(hf_config, moe_backend=moe_backend)
    init_random_(model, std=std, seed=seed)
    return model.eval(), hf_config


def random_builder(
    config: dict[str, Any] | PretrainedConfig, **kwargs: Any
) -> Callable[[torch.device, torch.dtype, str], tuple[nn.Module, PretrainedConfig]]:
    """A ``ModelRunner(build=...)`` callback that builds the random model."""

    def build(
        device: torch.device, dtype: torch.dtype, moe_backend: str
    ) -> tuple[nn.Module, PretrainedConfig]:
        return build_random_model(
            config, device=device, dtype=dtype, moe_backend=moe_backend, **kwargs
        )

    return build
