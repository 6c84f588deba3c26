"""GGUF checkpoints: config from the metadata, weights dequantized with the ``gguf`` package.

Supported GGUF architectures: ``llama`` (dense, or MoE → Mixtral), ``qwen2``, ``qwen3`` and
``qwen3moe``. Tensors are renamed to HF names so the models' ordinary ``load_weights`` applies.

llama.cpp's converter permutes the rows of ``attn_q`` / ``attn_k`` of llama-architecture models
from HF's rotate-half layout to GPT-J's interleaved pairs (per head: rows ``[0, d/2, 1, d/2+1,
...]``); the permutation is undone here, with ``n_head_kv`` heads for ``attn_k``. Qwen models
are converted without it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoConfig, PretrainedConfig

from outrider.workers.models.base import ModelLoadError

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_gate_inp": "mlp.gate",
}
_EXPERT_NAMES = {"ffn_gate": "gate_proj", "ffn_up": "up_proj", "ffn_down": "down_proj"}
_BLOCK = re.compile(r"^blk\.(\d+)\.(\w+?)(?:_exps|\.(\d+))?\.(weight|bias)$")
_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
}


def open_gguf(path: Path) -> Any:
    from gguf import GGUFReader

    try:
        return GGUFReader(str(path))
    except Exception as e:
        raise ModelLoadError(f"cannot read GGUF file {path}: {e}") from e


def _meta(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _tensor_names(reader: Any) -> set[str]:
    return {t.name for t in reader.tensors}


def gguf_config(reader: Any, path: Path) -> PretrainedConfig:
    """Build the HF config of a GGUF file from its metadata."""
    arch = _meta(reader, "general.architecture")
    p = f"{arch}."
    if _meta(reader, p + "block_count") is None:
        raise ModelLoadError(f"{path}: GGUF metadata lacks {p}block_count")
    names = _tensor_names(reader)
    heads = int(_meta(reader, p + "attention.head_count"))
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    kw: dict[str, Any] = {
        "hidden_size": int(_meta(reader, p + "embedding_length")),
        "intermediate_size": int(_meta(reader, p + "feed_forward_length", 0)),
        "num_hidden_layers": int(_meta(reader, p + "block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_meta(reader, p + "attention.head_count_kv", heads)),
        "max_position_embeddings": int(_meta(reader, p + "context_length", 2048)),
        "rms_norm_eps": float(_meta(reader, p + "attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(_meta(reader, p + "rope.freq_base", 10000.0)),
        "vocab_size": int(
            _meta(reader, p + "vocab_size", len(tokens.data) if tokens is not None else 0)
        ),
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": _meta(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _meta(reader, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": _meta(reader, "tokenizer.ggml.padding_token_id"),
    }
    key_length = _meta(reader, p + "attention.key_length")
    if key_length is not None:
        kw["head_dim"] = int(key_length)
    scaling = _meta(reader, p + "rope.scaling.type", "none")
    if scaling == "linear":
        factor = float(_meta(reader, p + "rope.scaling.factor"))
        kw["rope_scaling"] = {"rope_type": "linear", "factor": factor}
    elif scaling != "none":
        raise ModelLoadError(f"{path}: GGUF rope scaling {scaling!r} is not supported")
    if "rope_freqs.weight" in names:
        raise ModelLoadError(
            f"{path}: GGUF rope_freqs (Llama 3.1 long-context rope) is not supported; "
            "load the HF checkpoint instead"
        )
    experts = int(_meta(reader, p + "expert_count", 0) or 0)
    if arch == "llama":
        model_type = "mixtral" if experts else "llama"
        if experts:
            kw["num_local_experts"] = experts
            kw["num_experts_per_tok"] = int(_meta(reader, p + "expert_used_count"))
    elif arch in ("qwen2", "qwen3"):
        model_type = arch
    elif arch == "qwen3moe":
        model_type = "qwen3_moe"
        kw["num_experts"] = experts
        kw["num_experts_per_tok"] = int(_meta(reader, p + "expert_used_count"))
        kw["moe_intermediate_size"] = int(_meta(reader, p + "expert_feed_forward_length"))
        kw["norm_topk_prob"] = bool(_meta(reader, p + "expert_weights_norm", True))
    else:
        raise ModelLoadError(
            f"{path}: GGUF architecture {arch!r} is not supported; supported: llama, qwen2, "
            "qwen3, qwen3moe"
        )
    config = AutoConfig.for_model(model_type, **kw)
    config.architectures = [_ARCHITECTURES[model_type]]
    return config


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Invert llama.cpp's q/k row permutation (GPT-J pairs → HF rotate-half halves)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_name(gguf_name: str) -> tuple[str, bool] | None:
    """HF name of a tensor, and whether it stacks experts along dim 0."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name], False
    m = _BLOCK.match(gguf_name)
    if m is None:
        return None
    layer, base, expert, kind = m.group(1), m.group(2), m.group(3), m.group(4)
    stacked = gguf_name.endswith(f"_exps.{kind}")
    if stacked or expert is not None:
        if base not in _EXPERT_NAMES:
            return None
        slot = "{e}" if stacked else expert
        return f"model.layers.{layer}.mlp.experts.{slot}.{_EXPERT_NAMES[base]}.{kind}", stacked
    if base not in _BLOCK_NAMES:
        return None
    return f"model.layers.{layer}.{_BLOCK_NAMES[base]}.{kind}", False


def gguf_weights(
    reader: Any, config: PretrainedConfig, path: Path
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(hf_name, float32 tensor)`` for every tensor of the file, dequantized."""
    from gguf.quants import dequantize

    arch = _meta(reader, "general.architecture")
    for tensor in reader.tensors:
        mapped = _hf_name(tensor.name)
        if mapped is None:
            raise ModelLoadError(f"{path}: unexpected GGUF tensor {tensor.name}")
        name, stacked = mapped
        w = dequantize(tensor.data, tensor.tensor_type)
        if arch == "llama" and (".attn_q." in tensor.name or ".attn_k." in tensor.name):
            heads = config.num_attention_heads
            if ".attn_k." in tensor.name:
                heads = config.num_key_value_heads
            w = _unpermute(w, heads)
        t = torch.from_numpy(np.array(w, dtype=np.float32, copy=True))
        if stacked:
            for e in range(t.shape[0]):
                yield name.format(e=e), t[e]
        else:
            yield name, t
