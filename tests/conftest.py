from __future__ import annotations

import os

if os.environ.get("OUTRIDER_TRITON_INTERPRET") == "1":
    # NOTE: read by triton when it is imported (transformers imports it below); see tests/gpu.
    os.environ["TRITON_INTERPRET"] = "1"

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    LlamaConfig,
    MixtralConfig,
    PretrainedConfig,
    Qwen3Config,
    Qwen3MoeConfig,
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    reason = "needs CUDA (run on the device machine; see tests/gpu/README.md)"
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


TINY_COMMON: dict[str, Any] = dict(
    vocab_size=96,
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    eos_token_id=3,
    bos_token_id=1,
)


def tiny_config(kind: str, **overrides: Any) -> PretrainedConfig:
    """Small random-model configs of every supported architecture family."""
    common = {**TINY_COMMON, **overrides}
    if kind == "llama":
        return LlamaConfig(**{"intermediate_size": 128, "num_hidden_layers": 4, **common})
    if kind == "qwen3":
        return Qwen3Config(
            **{"intermediate_size": 128, "num_hidden_layers": 4, "head_dim": 32, **common}
        )
    if kind == "qwen3_moe":
        return Qwen3MoeConfig(
            **{
                "intermediate_size": 96,
                "moe_intermediate_size": 32,
                "num_hidden_layers": 4,
                "num_experts": 8,
                "num_experts_per_tok": 2,
                "norm_topk_prob": True,
                "mlp_only_layers": [0],
                **common,
            }
        )
    if kind == "mixtral":
        return MixtralConfig(
            **{
                "intermediate_size": 48,
                "num_hidden_layers": 3,
                "num_local_experts": 4,
                "num_experts_per_tok": 2,
                "sliding_window": None,
                **common,
            }
        )
    raise ValueError(kind)


def randomize(model: torch.nn.Module, scale: float = 0.15) -> None:
    # NOTE: HF's 0.02 init makes attention near-uniform, which would hide rotary/mask bugs.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif p.dim() == 1:
                p.normal_(0.0, 0.1)
            else:
                p.normal_(0.0, scale)


TinyFactory = Callable[..., tuple[Path, torch.nn.Module]]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> TinyFactory:
    """``tiny_model(kind, seed=0, **config_overrides) -> (dir, transformers model in float64)``.

    The model is saved with ``save_pretrained`` (so outrider loads it like any HF directory) and
    cached per arguments for the session.
    """
    cache: dict[tuple[Any, ...], tuple[Path, torch.nn.Module]] = {}

    def make(kind: str, seed: int = 0, **overrides: Any) -> tuple[Path, torch.nn.Module]:
        key = (kind, seed, tuple(sorted(overrides.items())))
        if key not in cache:
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(
                tiny_config(kind, **overrides),
                attn_implementation="sdpa",
                experts_implementation="eager",
            ).to(torch.float64)
            randomize(model)
            path = tmp_path_factory.mktemp(f"{kind}-{seed}")
            model.save_pretrained(path)
            cache[key] = (path, model.eval())
        return cache[key]

    return make
