"""Trainable EAGLE-3 / P-EAGLE and DFlash drafters whose parameter names are speculators'.

``state_dict()`` keys are exactly the checkpoint's tensor names (§4.2, §5.2, §6.2 of the format
notes), except the frozen ``embed_tokens`` copy of the target's embedding, which is not exported:
the runtime shares it from the target, as vLLM does. The masks that make one dense attention call
equal to the serving-time KV-cache view are built here too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from outrider.train.layers import DecoderLayer, RMSNorm
from outrider.workers.layers.rotary import get_rope


@dataclass(frozen=True)
class DraftShape:
    hidden_size: int  # H (= target hidden size)
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_layers: int
    rms_norm_eps: float
    vocab_size: int  # Vt
    draft_vocab_size: int  # Vd
    num_aux: int  # A
    max_position_embeddings: int
    rope: dict[str, Any]  # rope keys copied from the target config


# -- masks ------------------------------------------------------------------------------------
def chain_mask(t: int, depth: int, device: torch.device) -> torch.Tensor:
    """[T, (depth+1)·T] for one step of depth ``depth``: row i sees depth-0 keys j <= i and,
    in each later depth block up to its own, only key i (its own chain)."""
    idx = torch.arange(t, device=device)
    causal = idx[None, :] <= idx[:, None]  # [T, T]
    diag = idx[None, :] == idx[:, None]
    return torch.cat([causal] + [diag] * depth, dim=1)


def parallel_chain_mask(t: int, depths: int, device: torch.device) -> torch.Tensor:
    """[D·T, D·T] over depth-major rows (d, i): depth-0 keys j <= i, plus keys (d', i) for
    1 <= d' <= d. Equal to the causal KV-cache view of P-EAGLE's mask slots."""
    rows = [
        torch.cat(
            [chain_mask(t, d, device)]
            + [torch.zeros(t, t, dtype=torch.bool, device=device)] * (depths - 1 - d),
            dim=1,
        )
        for d in range(depths)
    ]
    return torch.cat(rows, dim=0)


def block_mask(
    anchors: torch.Tensor,  # [B, n] anchor positions
    t: int,
    block: int,
    causal: bool,
) -> torch.Tensor:
    """[B, n·block, T + n·block]: a block sees context positions < its anchor and its own block
    (all of it, or causally)."""
    b, n = anchors.shape
    dev = anchors.device
    ctx = torch.arange(t, device=dev)[None, None, :] < anchors[:, :, None]  # [B, n, T]
    ctx = ctx.repeat_interleave(block, dim=1)  # [B, n·block, T]
    owner = torch.arange(n, device=dev).repeat_interleave(block)  # [n·block]
    slot = torch.arange(block, device=dev).repeat(n)
    own = owner[:, None] == owner[None, :]
    if causal:
        own = own & (slot[None, :] <= slot[:, None])
    return torch.cat([ctx, own[None].expand(b, -1, -1)], dim=2)


# -- EAGLE-3 / P-EAGLE ------------------------------------------------------------------------
class EagleDrafter(nn.Module):
    """EAGLE-3 head (llama layers): norm_before_fc, norm_before_residual, norm_output all on."""

    def __init__(self, shape: DraftShape, *, parallel: bool) -> None:
        super().__init__()
        h, eps = shape.hidden_size, shape.rms_norm_eps
        aux_width = shape.num_aux * h
        self.shape = shape
        self.embed_tokens = nn.Embedding(shape.vocab_size, h)
        self.embed_tokens.weight.requires_grad_(False)
        self.input_norm = RMSNorm(aux_width, eps)
        self.fc = nn.Linear(aux_width, h, bias=False)
        args = (
            h,
            shape.intermediate_size,
            shape.num_heads,
            shape.num_kv_heads,
            shape.head_dim,
            eps,
        )
        self.layers = nn.ModuleList(
            [DecoderLayer(*args, qk_norm=False, first=True)]
            + [DecoderLayer(*args, qk_norm=False) for _ in range(1, shape.num_layers)]
        )
        self.norm = RMSNorm(h, eps)
        self.lm_head = nn.Linear(h, shape.draft_vocab_size, bias=False)
        self.mask_hidden = nn.Parameter(torch.randn(1, 1, aux_width)) if parallel else None
        self.rope = get_rope(shape.head_dim, shape.max_position_embeddings, _RopeCfg(shape.rope))

    def fuse(self, aux: torch.Tensor) -> torch.Tensor:
        return self.fc(self.input_norm(aux.to(self.fc.weight.dtype)))  # [..., H]

    def step(
        self,
        input_ids: torch.Tensor,  # [B, N]
        hidden: torch.Tensor,  # [B, N, H]
        positions: torch.Tensor,  # [B, N]
        mask: torch.Tensor,  # [1, N, M]
        past: list[list[tuple[torch.Tensor, torch.Tensor]]] | None = None,  # per layer
    ) -> tuple[torch.Tensor, torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """``(logits [B, N, Vd], fed-back hidden [B, N, H], per-layer own (K, V))``."""
        first = self.layers[0]
        e = first.input_layernorm(self.embed_tokens(input_ids))  # [B, N, H]
        assert first.hidden_norm is not None
        x = first.hidden_norm(hidden)
        layer_past = past or [[] for _ in self.layers]
        a, kv0 = first.self_attn(
            torch.cat([e, x], dim=-1), positions, self.rope, mask, layer_past[0]
        )
        # NOTE: norm_before_residual: the residual is the normed hidden.
        y = x + a
        y = y + first.mlp(first.post_attention_layernorm(y))
        kvs = [kv0]
        for i, layer in enumerate(self.layers[1:], start=1):
            y, kv = layer(y, positions, self.rope, mask, layer_past[i])
            kvs.append(kv)
        n = self.norm(y)
        # NOTE: norm_output: the fed-back hidden is the normed output.
        return self.lm_head(n), n, kvs

    def export_state(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if not k.startswith("embed_tokens.")}


# -- DFlash -----------------------------------------------------------------------------------
class DFlashDrafter(nn.Module):
    """DFlash block drafter (Qwen3 layers with q/k norm)."""

    def __init__(self, shape: DraftShape) -> None:
        super().__init__()
        h, eps = shape.hidden_size, shape.rms_norm_eps
        self.shape = shape
        self.embed_tokens = nn.Embedding(shape.vocab_size, h)
        self.embed_tokens.weight.requires_grad_(False)
        self.fc = nn.Linear(shape.num_aux * h, h, bias=False)
        self.hidden_norm = RMSNorm(h, eps)
        self.layers = nn.ModuleList(
            DecoderLayer(
                h,
                shape.intermediate_size,
                shape.num_heads,
                shape.num_kv_heads,
                shape.head_dim,
                eps,
                qk_norm=True,
            )
            for _ in range(shape.num_layers)
        )
        self.norm = RMSNorm(h, eps)
        self.lm_head = nn.Linear(h, shape.draft_vocab_size, bias=False)
        self.rope = get_rope(shape.head_dim, shape.max_position_embeddings, _RopeCfg(shape.rope))

    def forward(
        self,
        aux: torch.Tensor,  # [B, T, A*H] context features
        block_ids: torch.Tensor,  # [B, n·block]
        block_positions: torch.Tensor,  # [B, n·block]
        mask: torch.Tensor,  # [B, n·block, T + n·block]
    ) -> torch.Tensor:
        """Draft logits [B, n·block, Vd] of every block slot."""
        b, t, _ = aux.shape
        c = self.hidden_norm(self.fc(aux.to(self.fc.weight.dtype)))  # [B, T, H]
        ctx_pos = torch.arange(t, device=aux.device).expand(b, t)
        x = self.embed_tokens(block_ids)  # [B, nB, H]
        for layer in self.layers:
            # NOTE: context K/V come from c directly: no input_layernorm, one c for all layers.
            ctx_kv = layer.self_attn.keys(c, ctx_pos, self.rope)
            x, _ = layer(x, block_positions, self.rope, mask, [ctx_kv])
        return self.lm_head(self.norm(x))

    def export_state(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if not k.startswith("embed_tokens.")}


class _RopeCfg:
    """The attributes ``get_rope`` reads, from a plain dict of the target's rope keys."""

    def __init__(self, rope: dict[str, Any]) -> None:
        for k, v in rope.items():
            setattr(self, k, v)
