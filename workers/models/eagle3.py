"""EAGLE-3 / P-EAGLE draft model in the speculators checkpoint format (Llama or Qwen3 layers).

One evaluation takes a target-vocab token and an H-wide hidden per draft KV entry. The first
layer attends over ``[RMS(embed(token)) ; RMS(hidden)]`` (2H wide, embedding first) with the
hidden (normed or raw, per ``norm_before_residual``) as its residual; later layers are plain
decoder layers. The target's aux hidden states enter through ``fuse`` (optional norms, then
``fc``); later sequential steps feed back the model's own output instead. Draft logits cover
``Vd`` tokens and are scattered into the target vocabulary through ``d2t`` offsets.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, PretrainedConfig

from outrider.workers.layers.linear import (
    QKVParallelLinear,
    ReplicatedLinear,
    invalidate_packed_weights,
)
from outrider.workers.layers.norm import RMSNorm
from outrider.workers.layers.rotary import RotaryEmbedding, get_rope
from outrider.workers.layers.vocab import ParallelLMHead, VocabParallelEmbedding
from outrider.workers.models.base import ModelLoadError
from outrider.workers.models.llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaMLP,
    head_dim_of,
)
from outrider.workers.models.loader import iterate_safetensors, safetensors_files
from outrider.workers.models.target_tensors import (
    SharedReader,
    draft_to_target_ids,
    load_shared_head,
)
from outrider.workers.models.weight_mapping import load_routed, route, unexpected
from outrider.workers.speculators import SpeculatorsCheckpoint

logger = logging.getLogger(__name__)

SUPPORTED_LAYER_TYPES = ("llama", "qwen3")
# NOTE: the target->draft mask and training-only ``verifier_*`` tensors; inference needs neither.
_IGNORED_PREFIXES = ("t2d", "verifier_")


@dataclass(frozen=True)
class Eagle3Options:
    num_aux: int  # A
    aux_hidden_size: int  # Ht
    draft_vocab_size: int  # Vd
    qk_norm: bool
    norm_before_residual: bool
    norm_before_fc: bool
    fc_norm: bool
    norm_output: bool


def draft_config(layer_config: dict[str, Any], model_type: str) -> PretrainedConfig:
    """The draft decoder's HF config from ``transformer_layer_config``."""
    if model_type not in SUPPORTED_LAYER_TYPES:
        raise ValueError(
            f"transformer_layer_config.model_type {model_type!r} is not supported for EAGLE-3; "
            f"choices: {', '.join(SUPPORTED_LAYER_TYPES)}"
        )
    kwargs = {k: v for k, v in layer_config.items() if k != "model_type"}
    config = AutoConfig.for_model(model_type, **kwargs)
    act = getattr(config, "hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"transformer_layer_config.hidden_act {act!r} is not supported: silu")
    return config


class Eagle3FirstLayer(nn.Module):
    """Decoder layer 0: q/k/v read ``[RMS(embed) ; RMS(hidden)]`` (2H wide)."""

    def __init__(
        self, config: PretrainedConfig, rotary: RotaryEmbedding, opts: Eagle3Options
    ) -> None:
        super().__init__()
        hidden, eps = config.hidden_size, config.rms_norm_eps
        bias = bool(getattr(config, "attention_bias", False))
        self.self_attn = LlamaAttention(config, 0, rotary, bias, bias, opts.qk_norm)
        # NOTE: only the q/k/v input width differs from a standard layer.
        self.self_attn.qkv_proj = QKVParallelLinear(
            2 * hidden,
            head_dim_of(config),
            config.num_attention_heads,
            config.num_key_value_heads,
            bias=bias,
        )
        self.mlp = LlamaMLP(
            hidden, config.intermediate_size, bool(getattr(config, "mlp_bias", False))
        )
        self.input_layernorm = RMSNorm(hidden, eps=eps)
        self.hidden_norm = RMSNorm(hidden, eps=eps)
        self.post_attention_layernorm = RMSNorm(hidden, eps=eps)
        self.norm_before_residual = opts.norm_before_residual

    def forward(
        self,
        positions: torch.Tensor,  # [T]
        embeds: torch.Tensor,  # [T, H]
        hidden_states: torch.Tensor,  # [T, H]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        e = self.input_layernorm(embeds)  # [T, H]
        x = self.hidden_norm(hidden_states)  # [T, H]
        residual = x if self.norm_before_residual else hidden_states
        attn = self.self_attn(positions, torch.cat([e, x], dim=-1))  # [T, H]
        h, residual = self.post_attention_layernorm(attn, residual)
        return self.mlp(h), residual


class Eagle3DraftModel(nn.Module):
    def __init__(self, config: PretrainedConfig, opts: Eagle3Options) -> None:
        super().__init__()
        self.config = config
        self.opts = opts
        hidden, eps = config.hidden_size, config.rms_norm_eps
        self.vocab_size = config.vocab_size
        aux_width = opts.num_aux * opts.aux_hidden_size
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, hidden)
        self.fc = ReplicatedLinear(aux_width, hidden, bias=False)
        self.input_norm = RMSNorm(aux_width, eps=eps) if opts.norm_before_fc else None
        self.fc_norm = (
            nn.ModuleList(RMSNorm(opts.aux_hidden_size, eps=eps) for _ in range(opts.num_aux))
            if opts.fc_norm
            else None
        )
        self.rotary_emb = get_rope(head_dim_of(config), config.max_position_embeddings, config)
        bias = bool(getattr(config, "attention_bias", False))
        mlp_bias = bool(getattr(config, "mlp_bias", False))
        layers: list[nn.Module] = [Eagle3FirstLayer(config, self.rotary_emb, opts)]
        for i in range(1, config.num_hidden_layers):
            attn = LlamaAttention(config, i, self.rotary_emb, bias, bias, opts.qk_norm)
            mlp = LlamaMLP(hidden, config.intermediate_size, mlp_bias)
            layers.append(LlamaDecoderLayer(config, attn, mlp))
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(hidden, eps=eps)
        self.lm_head = ParallelLMHead(opts.draft_vocab_size, hidden)
        # draft id -> target id [Vd] (None when Vd == Vt)
        self.draft_to_target: torch.Tensor | None
        self.register_buffer("draft_to_target", None, persistent=False)
        # fc(mask_hidden) [1, H]: the P-EAGLE mask slot's hidden (None without mask_hidden)
        self.mask_fused: torch.Tensor | None
        self.register_buffer("mask_fused", None, persistent=False)

    # -- forward ----------------------------------------------------------------------------
    def fuse(self, aux: torch.Tensor) -> torch.Tensor:
        """Target aux hidden states [T, A*Ht] (ascending layer ids) -> fc input hidden [T, H]."""
        g = aux.to(self.fc.weight.dtype)
        if self.input_norm is not None:
            g = self.input_norm(g)
        if self.fc_norm is not None:
            chunks = g.split(self.opts.aux_hidden_size, dim=-1)
            g = torch.cat([n(c) for n, c in zip(self.fc_norm, chunks, strict=True)], dim=-1)
        return self.fc(g)  # [T, H]

    def forward(
        self,
        input_ids: torch.Tensor,  # [T] target-vocab ids
        positions: torch.Tensor,  # [T]
        hidden_states: torch.Tensor,  # [T, H]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(z, fed_back)``: the pre-norm output [T, H] and the hidden to feed back [T, H]."""
        embeds = self.embed_tokens(input_ids)  # [T, H]
        h, residual = self.layers[0](positions, embeds, hidden_states.to(embeds.dtype))
        for layer in self.layers[1:]:
            h, residual = layer(positions, h, residual)
        z = h + residual  # [T, H]
        return z, self.norm(z) if self.opts.norm_output else z

    def compute_logits(self, z: torch.Tensor) -> torch.Tensor:
        """Target-vocabulary logits [N, Vt] from pre-norm outputs z [N, H]."""
        logits = self.lm_head.compute_logits(self.norm(z))  # [N, Vd]
        if self.draft_to_target is None:
            return logits
        out = logits.new_full((logits.shape[0], self.vocab_size), float("-inf"))
        return out.index_copy_(1, self.draft_to_target, logits)  # [N, Vt]

    # -- loading ----------------------------------------------------------------------------
    def load_weights(
        self,
        weights: Iterable[tuple[str, torch.Tensor]],
        shared: SharedReader | None = None,
        *,
        require_mask_hidden: bool = False,
    ) -> set[str]:
        """Load speculators-named tensors; take embed/lm_head from ``shared`` when absent.

        Returns the loaded parameter names; raises ValueError naming unexpected, missing or
        mis-shaped tensors.
        """
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        unknown: set[str] = set()
        d2t: torch.Tensor | None = None
        mask_hidden: torch.Tensor | None = None
        for ckpt_name, weight in weights:
            name = ckpt_name
            if name.startswith("midlayer."):
                name = "layers.0." + name.removeprefix("midlayer.")
            if name.startswith(_IGNORED_PREFIXES) or "rotary_emb.inv_freq" in name:
                continue
            if name == "d2t":
                d2t = weight
                continue
            if name == "mask_hidden":
                mask_hidden = weight
                continue
            if name.startswith("input_norm.") and self.input_norm is None:
                continue
            routed = route(name)
            if routed.param_name not in params:
                unknown.add(ckpt_name)
                continue
            try:
                load_routed(params, routed, weight)
            except ValueError as e:
                raise ValueError(f"tensor {ckpt_name}: {e}") from None
            loaded.add(routed.param_name)
        if unknown:
            raise ValueError(f"unexpected tensors in the EAGLE-3 checkpoint: {unexpected(unknown)}")
        self._load_shared(loaded, params, shared)
        missing = set(params) - loaded
        if missing:
            raise ValueError(f"the EAGLE-3 checkpoint lacks {unexpected(missing)}")
        self._set_vocab_map(d2t)
        if mask_hidden is not None:
            self._set_mask_hidden(mask_hidden)
        elif require_mask_hidden:
            raise ValueError("parallel drafting (P-EAGLE) needs the `mask_hidden` tensor")
        return loaded

    def _load_shared(
        self, loaded: set[str], params: dict[str, nn.Parameter], shared: SharedReader | None
    ) -> None:
        load_shared_head(
            params,
            loaded,
            shared,
            draft_vocab_size=self.opts.draft_vocab_size,
            vocab_size=self.vocab_size,
        )

    def _set_vocab_map(self, d2t: torch.Tensor | None) -> None:
        ids = draft_to_target_ids(
            d2t, draft_vocab_size=self.opts.draft_vocab_size, vocab_size=self.vocab_size
        )
        if ids is not None:
            self.draft_to_target = ids.to(self.lm_head.weight.device)

    def _set_mask_hidden(self, mask_hidden: torch.Tensor) -> None:
        width = self.opts.num_aux * self.opts.aux_hidden_size
        if mask_hidden.numel() != width:
            raise ValueError(
                f"mask_hidden has shape {tuple(mask_hidden.shape)}, expected (1, 1, {width})"
            )
        aux = mask_hidden.reshape(1, width).to(self.fc.weight.device)
        self.mask_fused = self.fuse(aux)  # [1, H]


# -- building from a checkpoint -----------------------------------------------------------------
def _tensor_names(files: list[Path]) -> set[str]:
    from safetensors import safe_open

    names: set[str] = set()
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            names.update(f.keys())
    return names


def _layer_model_type(ckpt: SpeculatorsCheckpoint, files: list[Path]) -> str:
    model_type = ckpt.transformer_layer_config.get("model_type")
    if isinstance(model_type, str):
        return model_type
    # NOTE: speculators >= 0.7 defaults to qwen3, vLLM to llama; the q_norm tensors decide.
    return "qwen3" if any(".q_norm." in n for n in _tensor_names(files)) else "llama"


def _warn_sliding_window(config: PretrainedConfig) -> None:
    layer_types = getattr(config, "layer_types", None) or []
    window = getattr(config, "sliding_window", None)
    if window and "sliding_attention" in layer_types:
        logger.warning(
            "EAGLE-3 draft layers attend over the full context: the sliding window of %d "
            "tokens is not applied (drafts past it may differ from training; output stays "
            "lossless)",
            window,
        )


def load_eagle3_model(
    ckpt: SpeculatorsCheckpoint,
    *,
    num_aux: int,
    device: torch.device,
    dtype: torch.dtype,
    shared: SharedReader | None,
    require_mask_hidden: bool,
) -> tuple[Eagle3DraftModel, PretrainedConfig]:
    """Build the draft model of a speculators eagle3/peagle checkpoint and load its weights."""
    files = safetensors_files(ckpt.path)
    try:
        model_type = _layer_model_type(ckpt, files)
        config = draft_config(ckpt.transformer_layer_config, model_type)
        _warn_sliding_window(config)
        opts = Eagle3Options(
            num_aux=num_aux,
            aux_hidden_size=ckpt.target_hidden_size or config.hidden_size,
            draft_vocab_size=ckpt.draft_vocab_size,
            qk_norm=model_type == "qwen3",
            norm_before_residual=ckpt.norm_before_residual,
            norm_before_fc=ckpt.norm_before_fc,
            fc_norm=ckpt.fc_norm,
            norm_output=ckpt.norm_output,
        )
        prev = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                model = Eagle3DraftModel(config, opts)
        finally:
            torch.set_default_dtype(prev)
        with torch.no_grad():
            model.load_weights(
                iterate_safetensors(files), shared, require_mask_hidden=require_mask_hidden
            )
    except ModelLoadError:
        raise
    except ValueError as e:
        raise ModelLoadError(f"{ckpt.path}: {e}") from e
    invalidate_packed_weights(model)
    return model.eval(), config
