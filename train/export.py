"""Write a trained drafter in the speculators layout: config.json + model.safetensors.

Float tensors are saved in bf16; ``d2t`` int64 and ``t2d`` bool when the draft vocabulary is
reduced. The frozen embedding is not saved (the runtime shares the target's), which keeps the
heads small. The config carries every key vLLM reads, with the values the weights were trained
for (so no loader has to guess a default).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from outrider.train.modules import DraftShape
from outrider.train.vocab import DraftVocab

SPECULATORS_VERSION = "0.9.0"  # the format revision these files follow


def layer_config(shape: DraftShape, model_type: str) -> dict[str, Any]:
    return {
        "model_type": model_type,
        "architectures": ["LlamaForCausalLM" if model_type == "llama" else "Qwen3ForCausalLM"],
        "hidden_size": shape.hidden_size,
        "intermediate_size": shape.intermediate_size,
        "num_attention_heads": shape.num_heads,
        "num_key_value_heads": shape.num_kv_heads,
        "head_dim": shape.head_dim,
        "num_hidden_layers": shape.num_layers,
        "hidden_act": "silu",
        "rms_norm_eps": shape.rms_norm_eps,
        "vocab_size": shape.vocab_size,
        "max_position_embeddings": shape.max_position_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "layer_types": ["full_attention"] * shape.num_layers,
        **shape.rope,
    }


def speculators_block(
    algorithm: str, num_speculative_tokens: int, verifier: str | None, architectures: list[str]
) -> dict[str, Any]:
    return {
        "algorithm": algorithm,
        "proposal_methods": [
            {
                "proposal_type": "greedy",
                "speculative_tokens": num_speculative_tokens,
                "verifier_accept_k": 1,
                "accept_tolerance": 0.0,
            }
        ],
        "default_proposal_method": "greedy",
        "verifier": {"name_or_path": verifier, "architectures": architectures},
    }


def build_config(
    method: str,
    shape: DraftShape,
    *,
    num_speculative_tokens: int,
    aux_layer_ids: list[int],
    verifier: str | None,
    verifier_architectures: list[str],
    mask_token_id: int | None,
) -> dict[str, Any]:
    arch = {
        "eagle3": "Eagle3DraftModel",
        "peagle": "PEagleDraftModel",
        "dflash": "DFlashDraftModel",
    }
    cfg: dict[str, Any] = {
        "architectures": [arch[method]],
        "speculators_model_type": method,
        "speculators_version": SPECULATORS_VERSION,
        "speculators_config": speculators_block(
            method, num_speculative_tokens, verifier, verifier_architectures
        ),
        "draft_vocab_size": shape.draft_vocab_size,
        "target_hidden_size": None,
        "tie_word_embeddings": False,
        "dtype": "bfloat16",
    }
    if method == "dflash":
        cfg.update(
            transformer_layer_config=layer_config(shape, "qwen3"),
            aux_hidden_state_layer_ids=aux_layer_ids,
            mask_token_id=mask_token_id,
            block_size=num_speculative_tokens + 1,
            # NOTE: the block was trained bidirectional; vLLM reads a missing key the same way.
            sliding_window_non_causal=True,
            sample_from_anchor=False,
        )
    else:
        cfg.update(
            transformer_layer_config=layer_config(shape, "llama"),
            eagle_aux_hidden_state_layer_ids=aux_layer_ids,
            norm_before_residual=True,
            norm_before_fc=True,
            fc_norm=False,
            norm_output=True,
            embed_requires_grad=False,
        )
        if method == "peagle":
            cfg["mask_token_id"] = mask_token_id
    return cfg


def save_drafter(
    out: Path,
    state: dict[str, torch.Tensor],
    vocab: DraftVocab,
    config: dict[str, Any],
) -> int:
    """Write the checkpoint; returns the safetensors file size in bytes."""
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", torch.bfloat16).contiguous() for k, v in state.items()}
    if vocab.draft_vocab_size != vocab.vocab_size:
        tensors["d2t"] = vocab.d2t.contiguous()
        tensors["t2d"] = vocab.t2d.contiguous()
    path = out / "model.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return path.stat().st_size
