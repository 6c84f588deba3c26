"""Random-weight EAGLE-3 / P-EAGLE checkpoints in the speculators format, for benchmarks.

The drafter runtime reads a speculators folder (config.json + model.safetensors), so a random
drafter at a real shape is written as one: the given config.json verbatim and, beside it, every
tensor the format names (the embedding included, so no target checkpoint is needed to share it)
drawn from ``N(0, std²)`` with norm weights 1. ``d2t`` maps draft id i to target id i when the
draft vocabulary is reduced; P-EAGLE configs get a ``mask_hidden``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

LAYER_TYPES = ("llama", "qwen3")


def _num_aux(config: dict[str, Any]) -> int:
    ids = config.get("eagle_aux_hidden_state_layer_ids")
    # NOTE: the runtime's default is three layers (2, n // 2, n - 3).
    return len(set(ids)) if ids else 3


def eagle3_tensor_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Speculators tensor name -> shape of the float tensors of an eagle3/peagle config.json."""
    layer = config["transformer_layer_config"]
    model_type = layer.get("model_type", "llama")
    if model_type not in LAYER_TYPES:
        raise ValueError(
            f"transformer_layer_config.model_type {model_type!r} is not supported; "
            f"choices: {', '.join(LAYER_TYPES)}"
        )
    if config.get("fc_norm"):
        raise ValueError("`fc_norm: true` drafters are not supported by the random writer")
    h = int(layer["hidden_size"])
    heads, kv_heads = int(layer["num_attention_heads"]), int(layer["num_key_value_heads"])
    head_dim = int(layer.get("head_dim") or h // heads)
    inter = int(layer["intermediate_size"])
    vocab = int(layer["vocab_size"])
    draft_vocab = int(config.get("draft_vocab_size") or vocab)
    aux_width = _num_aux(config) * int(config.get("target_hidden_size") or h)
    shapes: dict[str, tuple[int, ...]] = {
        "embed_tokens.weight": (vocab, h),
        "fc.weight": (h, aux_width),
        "norm.weight": (h,),
        "lm_head.weight": (draft_vocab, h),
    }
    if config.get("norm_before_fc"):
        shapes["input_norm.weight"] = (aux_width,)
    if config.get("speculators_model_type") == "peagle" or "mask_token_id" in config:
        shapes["mask_hidden"] = (1, 1, aux_width)
    for i in range(int(layer.get("num_hidden_layers", 1))):
        p = f"layers.{i}."
        # NOTE: layer 0 reads [embed ; hidden], twice the hidden width.
        width = 2 * h if i == 0 else h
        shapes[p + "self_attn.q_proj.weight"] = (heads * head_dim, width)
        shapes[p + "self_attn.k_proj.weight"] = (kv_heads * head_dim, width)
        shapes[p + "self_attn.v_proj.weight"] = (kv_heads * head_dim, width)
        shapes[p + "self_attn.o_proj.weight"] = (h, heads * head_dim)
        if model_type == "qwen3":
            shapes[p + "self_attn.q_norm.weight"] = (head_dim,)
            shapes[p + "self_attn.k_norm.weight"] = (head_dim,)
        shapes[p + "mlp.gate_proj.weight"] = (inter, h)
        shapes[p + "mlp.up_proj.weight"] = (inter, h)
        shapes[p + "mlp.down_proj.weight"] = (h, inter)
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        if i == 0:
            shapes[p + "hidden_norm.weight"] = (h,)
    return shapes


@torch.no_grad()
def random_eagle3_tensors(
    config: dict[str, Any],
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    std: float = 0.02,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """The tensors of a random checkpoint, drawn on ``device`` and returned on the CPU."""
    gen = torch.Generator(device=device).manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name, shape in eagle3_tensor_shapes(config).items():
        if name.endswith("norm.weight"):
            t = torch.ones(shape, dtype=dtype)
        else:
            t = torch.empty(shape, dtype=dtype, device=device).normal_(0.0, std, generator=gen)
        out[name] = t.cpu()
    layer = config["transformer_layer_config"]
    draft_vocab = int(config.get("draft_vocab_size") or layer["vocab_size"])
    if draft_vocab != int(layer["vocab_size"]):
        out["d2t"] = torch.zeros(draft_vocab, dtype=torch.int64)  # [Vd]: draft i -> target i
    return out


def write_random_eagle3(
    config: dict[str, Any],
    out_dir: str | Path,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
) -> Path:
    """Write ``config`` and random weights of its shape as a speculators folder; returns it."""
    from safetensors.torch import save_file

    path = Path(out_dir)
    path.mkdir(parents=True, exist_ok=True)
    tensors = random_eagle3_tensors(config, device=device, dtype=dtype, seed=seed)
    save_file(tensors, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(config, indent=1))
    return path
