"""Architecture name (``hf_config.architectures``) → model class."""

from __future__ import annotations

import importlib

from torch import nn
from transformers import PretrainedConfig

from outrider.workers.models.base import ModelLoadError

# architecture -> (module under outrider.workers.models, class)
_MODELS: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("llama", "MistralForCausalLM"),
    "Qwen2ForCausalLM": ("llama", "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": ("llama", "Qwen3ForCausalLM"),
    "Qwen3MoeForCausalLM": ("qwen3_moe", "Qwen3MoeForCausalLM"),
    "MixtralForCausalLM": ("mixtral", "MixtralForCausalLM"),
}
# NOTE: configs built from GGUF metadata carry a model_type but no architectures list.
_BY_MODEL_TYPE: dict[str, str] = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "mixtral": "MixtralForCausalLM",
}


def supported_architectures() -> list[str]:
    return sorted(_MODELS)


def architecture_of(config: PretrainedConfig) -> str:
    archs = list(getattr(config, "architectures", None) or [])
    for arch in archs:
        if arch in _MODELS:
            return arch
    if not archs and getattr(config, "model_type", None) in _BY_MODEL_TYPE:
        return _BY_MODEL_TYPE[config.model_type]
    named = ", ".join(archs) or f"model_type {getattr(config, 'model_type', None)!r}"
    raise ModelLoadError(
        f"unsupported model architecture {named}; supported: {', '.join(supported_architectures())}"
    )


def get_model_class(config: PretrainedConfig) -> type[nn.Module]:
    module, cls = _MODELS[architecture_of(config)]
    return getattr(importlib.import_module(f"outrider.workers.models.{module}"), cls)
