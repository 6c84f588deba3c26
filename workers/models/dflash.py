"""DFlash block drafter in the speculators checkpoint format (Qwen3-style layers).

Context tokens contribute keys and values only: their features are the target's fused aux hidden
states, ``c = RMS(fc(aux); hidden_norm)``, projected by every layer's ``k_proj`` / ``v_proj``
(``k_norm`` and rotary on K, no ``input_layernorm``). The query block ``[bonus, mask x k]`` runs
through plain decoder layers whose attention sees the cached context plus the block itself;
the runner's metadata decides whether the block is causal. Draft logits cover ``Vd`` tokens and
are scattered into the target vocabulary through ``d2t`` offsets.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, PretrainedConfig

from outrider.workers.layers.linear import ReplicatedLinear, invalidate_packed_weights
from outrider.workers.layers.norm import RMSNorm
from outrider.workers.layers.rotary import get_rope
from outrider.workers.layers.vocab import ParallelLMHead, VocabParallelEmbedding
from outrider.workers.models.base import IntermediateTensors, ModelLoadError, ModelOutput
from outrider.workers.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaMLP, head_dim_of
from outrider.workers.models.loader import iterate_safetensors, safetensors_files
from outrider.workers.models.target_tensors import (
    SharedReader,
    draft_to_target_ids,
    load_shared_head,
)
from outrider.workers.models.weight_mapping import load_routed, route, unexpected
from outrider.workers.speculators import SpeculatorsCheckpoint

logger = logging.getLogger(__name__)

# NOTE: t2d (target -> draft membership) is never needed at inference time.
_IGNORED = ("t2d", "verifier_lm_head.weight", "verifier_norm.weight")


def dflash_layer_config(layer_config: dict[str, Any]) -> PretrainedConfig:
    """The draft decoder's HF config; DFlash builds Qwen3-style layers whatever the model_type."""
    model_type = layer_config.get("model_type") or "qwen3"
    kwargs = {k: v for k, v in layer_config.items() if k != "model_type"}
    try:
        config = AutoConfig.for_model(model_type, **kwargs)
    except ValueError as e:
        raise ModelLoadError(f"transformer_layer_config: {e}") from None
    act = getattr(config, "hidden_act", "silu")
    if act != "silu":
        raise ModelLoadError(f"transformer_layer_config.hidden_act {act!r} is not supported: silu")
    return config


class DFlashDraftModel(nn.Module):
    def __init__(
        self,
        config: PretrainedConfig,
        *,
        num_aux: int,
        aux_hidden_size: int,
        draft_vocab_size: int,
    ) -> None:
        super().__init__()
        self.config = config
        hidden, eps = config.hidden_size, config.rms_norm_eps
        self.vocab_size = config.vocab_size  # Vt
        self.draft_vocab_size = draft_vocab_size  # Vd
        self.aux_width = num_aux * aux_hidden_size  # A * Ht
        self.head_dim = head_dim_of(config)
        self.rotary_emb = get_rope(self.head_dim, config.max_position_embeddings, config)
        self.fc = ReplicatedLinear(self.aux_width, hidden, bias=False)
        self.hidden_norm = RMSNorm(hidden, eps=eps)
        self.layers = nn.ModuleList(self._make_layer(i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(hidden, eps=eps)
        self.embed_tokens = VocabParallelEmbedding(self.vocab_size, hidden)
        self.lm_head = ParallelLMHead(draft_vocab_size, hidden)
        # draft id -> target id [Vd] (None when Vd == Vt)
        self.draft_to_target: torch.Tensor | None
        self.register_buffer("draft_to_target", None, persistent=False)

    def _make_layer(self, idx: int) -> LlamaDecoderLayer:
        cfg = self.config
        bias = bool(getattr(cfg, "attention_bias", False))
        attn = LlamaAttention(cfg, idx, self.rotary_emb, bias, bias, qk_norm=True)
        mlp = LlamaMLP(cfg.hidden_size, cfg.intermediate_size, getattr(cfg, "mlp_bias", False))
        return LlamaDecoderLayer(cfg, attn, mlp)

    # -- context ----------------------------------------------------------------------------
    def context_kv(
        self,
        aux: torch.Tensor,  # [T, A*Ht] fused target aux hidden states
        positions: torch.Tensor,  # [T]
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer ``(K [T, nKV, hd], V [T, nKV, hd])`` of context entries at ``positions``."""
        if aux.shape[-1] != self.aux_width:
            raise ValueError(
                f"DFlash context features are {aux.shape[-1]} wide, expected {self.aux_width} "
                "(aux layers x target hidden size)"
            )
        c = self.hidden_norm(self.fc(aux))  # [T, H]
        t = c.shape[0]
        out: list[tuple[torch.Tensor, torch.Tensor]] = []
        for layer in self.layers:
            attn: LlamaAttention = layer.self_attn
            qkv = attn.qkv_proj
            w = qkv.weight[attn.q_size :]  # [2 nKV hd, H]
            b = None if qkv.bias is None else qkv.bias[attn.q_size :]
            k, v = F.linear(c, w, b).split([attn.kv_size, attn.kv_size], dim=-1)  # [T, nKV hd]
            k = attn.k_norm(k.reshape(t, -1, self.head_dim)).reshape(t, attn.kv_size)
            _, k = self.rotary_emb(positions, k, k)
            out.append((k.view(t, -1, self.head_dim), v.reshape(t, -1, self.head_dim)))
        return out

    # -- block ------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,  # [T] block tokens (target vocabulary)
        positions: torch.Tensor,  # [T]
        intermediate: IntermediateTensors | None = None,
        aux_layer_ids: tuple[int, ...] = (),
    ) -> ModelOutput:
        """Final-normed hidden states [T, H] of the block tokens (context K/V must be cached)."""
        hidden = self.embed_tokens(input_ids)  # [T, H]
        residual: torch.Tensor | None = None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual)
        if residual is None:
            return ModelOutput(self.norm(hidden))
        hidden, _ = self.norm(hidden, residual)
        return ModelOutput(hidden)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head.compute_logits(hidden_states)  # [N, Vd]
        if self.draft_to_target is None:
            return logits
        out = logits.new_full((logits.shape[0], self.vocab_size), float("-inf"))
        return out.index_copy_(1, self.draft_to_target, logits)  # [N, Vt]

    # -- loading ----------------------------------------------------------------------------
    def load_weights(
        self, weights: Iterable[tuple[str, torch.Tensor]], shared: SharedReader | None = None
    ) -> set[str]:
        """Load speculators-named tensors (§6.2); embed/lm_head come from ``shared`` if absent.

        Returns the loaded parameter names; raises ValueError naming unexpected, missing or
        mis-shaped tensors.
        """
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        unknown: set[str] = set()
        d2t: torch.Tensor | None = None
        for name, weight in weights:
            if name in _IGNORED or "rotary_emb.inv_freq" in name:
                continue
            if name == "d2t":
                d2t = weight
                continue
            routed = route(name)
            if routed.param_name not in params:
                unknown.add(name)
                continue
            try:
                load_routed(params, routed, weight)
            except ValueError as e:
                raise ValueError(f"tensor {name}: {e}") from None
            loaded.add(routed.param_name)
        if unknown:
            raise ValueError(f"unexpected tensors in the DFlash checkpoint: {unexpected(unknown)}")
        self._load_shared(loaded, params, shared)
        missing = set(params) - loaded
        if missing:
            raise ValueError(f"the DFlash checkpoint lacks {unexpected(missing)}")
        self._set_vocab_map(d2t)
        return loaded

    def _load_shared(
        self, loaded: set[str], params: dict[str, nn.Parameter], shared: SharedReader | None
    ) -> None:
        load_shared_head(
            params,
            loaded,
            shared,
            draft_vocab_size=self.draft_vocab_size,
            vocab_size=self.vocab_size,
        )

    def _set_vocab_map(self, d2t: torch.Tensor | None) -> None:
        ids = draft_to_target_ids(
            d2t, draft_vocab_size=self.draft_vocab_size, vocab_size=self.vocab_size
        )
        if ids is not None:
            self.draft_to_target = ids.to(self.lm_head.weight.device)


def _sliding_window_note(config: PretrainedConfig, max_len: int) -> None:
    layer_types = getattr(config, "layer_types", None) or []
    window = getattr(config, "sliding_window", None)
    if window and "sliding_attention" in layer_types and window < max_len:
        logger.warning(
            "DFlash draft layers attend over the full context: the sliding window of %d "
            "tokens is not applied (drafts past it may differ from training; output stays "
            "lossless)",
            window,
        )


def load_dflash_model(
    ckpt: SpeculatorsCheckpoint,
    *,
    num_aux: int,
    device: torch.device,
    dtype: torch.dtype,
    shared: SharedReader | None,
) -> tuple[DFlashDraftModel, PretrainedConfig]:
    """Build the draft model of a speculators dflash checkpoint and load its weights."""
    config = dflash_layer_config(ckpt.transformer_layer_config)
    _sliding_window_note(config, int(config.max_position_embeddings))
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = DFlashDraftModel(
                config,
                num_aux=num_aux,
                aux_hidden_size=ckpt.target_hidden_size or config.hidden_size,
                draft_vocab_size=ckpt.draft_vocab_size,
            )
    finally:
        torch.set_default_dtype(prev)
    try:
        with torch.no_grad():
            model.load_weights(iterate_safetensors(safetensors_files(ckpt.path)), shared)
    except ModelLoadError:
        raise
    except ValueError as e:
        raise ModelLoadError(f"{ckpt.path}: {e}") from None
    invalidate_packed_weights(model)
    return model.eval(), config
