"""DFlash drafting from a speculators-format checkpoint: k drafts from one block forward.

Draft KV layout per sequence: the entry at position j holds the context K/V projected from the
target's fused hidden g_j (computed while the target processed x_j). A delta (start s, tokens
x_s..x_{s+n-1}, hidden rows g_{s-1}..g_{s+n-2}) therefore writes context entries at positions
max(s - 1, 0)..s + n - 2 (no attention), and the bonus b = x_{s+n-1} opens the query block at
position s + n - 1. The block's own K/V is speculative: the next delta truncates it away.

Parallel: one forward over ``[b, mask x k]``; slot i (1..k) predicts the token at b's position
+ i. Sequential: step i runs the block ``[b, d_1..d_{i-1}, mask]`` and takes its last slot, so
k forwards with the same weights.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from outrider.workers.config import ModelConfig, WorkerConfig
from outrider.workers.models.dflash import DFlashDraftModel, load_dflash_model
from outrider.workers.models.target_tensors import shared_reader
from outrider.workers.proposers.base import (
    DrafterCapabilities,
    DraftMode,
    ProposeItem,
    Proposer,
    ProposeResult,
)
from outrider.workers.proposers.drafting import DraftSampler
from outrider.workers.protocol import Delta
from outrider.workers.runner import ModelRunner, on_runner_device
from outrider.workers.spec_config import SpeculativeConfig
from outrider.workers.speculators import load_for_target
from outrider.workers.staging import select_rows

logger = logging.getLogger(__name__)

MAX_K = 32


def parallel_blocker(runner: ModelRunner, causal: bool) -> str | None:
    """Why this worker cannot draft a DFlash block in one forward (None when it can)."""
    if runner.cfg.parallel.pipeline_parallel_size > 1:
        return "pipeline_parallel"
    # NOTE: a causal block needs nothing special; a backend without masked blocks opts out.
    if not causal and not getattr(runner.attn_backend, "supports_non_causal", True):
        return "attention_backend"
    return None


class DFlashProposer(Proposer):
    method = "dflash"

    def __init__(
        self,
        spec: SpeculativeConfig,
        wcfg: WorkerConfig,
        *,
        target_vocab_size: int,
        target_num_layers: int,
        target_model: ModelConfig | None = None,
    ) -> None:
        self.spec = spec
        self.ckpt = ckpt = load_for_target(spec.model, "dflash", target_vocab_size)
        assert ckpt.mask_token_id is not None
        self.mask_token_id: int = ckpt.mask_token_id
        self.k = spec.num_speculative_tokens or ckpt.num_speculative_tokens
        self.aux_layer_ids = ckpt.resolved_aux_layer_ids(target_num_layers)
        self.causal = ckpt.causal
        shared = shared_reader(
            target_model.path if target_model is not None else None,
            fallback=ckpt.verifier_name_or_path,
            use_target=target_model is not None,
        )

        def build(device: torch.device, dtype: torch.dtype, moe_backend: str) -> tuple[Any, Any]:
            return load_dflash_model(
                ckpt, num_aux=len(self.aux_layer_ids), device=device, dtype=dtype, shared=shared
            )

        self.runner = ModelRunner(wcfg, group="drafter", build=build)
        if not self.causal:
            self.runner.warm_up_attention((False,))  # NOTE: the masked block's own variants
        self.model: DFlashDraftModel = self.runner.model  # type: ignore[assignment]
        self.sampler = DraftSampler(
            self.runner.device, draft_sampling=spec.draft_sampling, vocab_size=target_vocab_size
        )
        self._fallback = parallel_blocker(self.runner, self.causal)
        self._parallel = self._fallback is None
        if self._fallback is not None:
            logger.warning(
                "dflash drafter drafts sequentially (k forwards per round): %s", self._fallback
            )

    @property
    def capabilities(self) -> DrafterCapabilities:
        return DrafterCapabilities(
            method=self.method,
            parallel_drafting=self._parallel,
            needs_target_hidden_states=True,
            aux_layer_ids=self.aux_layer_ids,
            max_k=MAX_K,
            fallback_reason=self._fallback,
        )

    def kv_usage(self) -> dict[str, int]:
        return self.runner.kv_usage()

    def release(self, seq_ids: Sequence[int]) -> None:
        for s in seq_ids:
            self.sampler.release(s)
        self.runner.release(seq_ids)

    # -- the round --------------------------------------------------------------------------
    @on_runner_device
    @torch.inference_mode()
    def propose(self, items: Sequence[ProposeItem], mode: DraftMode) -> ProposeResult:
        for it in items:
            self.sampler.register(it.delta.seq_id, it.params)
            if it.num_draft > MAX_K:
                raise ValueError(f"DFlash drafts at most {MAX_K} tokens, asked {it.num_draft}")
            if it.num_draft > 0 and not it.delta.token_ids:
                raise ValueError(f"sequence {it.delta.seq_id}: an empty delta has no bonus token")
        self._ingest_context(items)
        drafts: list[list[int]] = [[] for _ in items]
        probs: list[list[torch.Tensor]] = [[] for _ in items]
        active = [b for b, it in enumerate(items) if it.num_draft > 0]
        if active and mode == "parallel" and self._parallel:
            self._draft_block(items, active, drafts, probs, parallel=True)
        elif active:
            for _ in range(max(items[b].num_draft for b in active)):
                todo = [b for b in active if len(drafts[b]) < items[b].num_draft]
                self._draft_block(items, todo, drafts, probs, parallel=False)
        return ProposeResult(drafts, [torch.stack(p) if p else None for p in probs])

    def _ingest_context(self, items: Sequence[ProposeItem]) -> None:
        """Write the context K/V of every delta's hidden rows; the entries get no queries."""
        deltas: list[Delta] = []
        feats: list[torch.Tensor] = []
        for it in items:
            d = it.delta
            rows = d.num_hidden_rows
            got = 0 if it.hidden_states is None else int(it.hidden_states.shape[0])
            if got != rows:
                raise ValueError(
                    f"sequence {d.seq_id}: a delta of {len(d.token_ids)} tokens from position "
                    f"{d.start_pos} pairs with {rows} target hidden-state rows, got {got}"
                )
            if rows == 0:
                continue
            assert it.hidden_states is not None
            # NOTE: context entries carry no token; the ids only size the append.
            deltas.append(Delta(d.seq_id, max(d.start_pos - 1, 0), [self.mask_token_id] * rows))
            feats.append(it.hidden_states)
        if not deltas:
            return
        batch = self.runner.prepare(deltas)
        aux = torch.cat(feats).to(device=self.runner.device, dtype=self.runner.dtype)
        kv = self.model.context_kv(aux, batch.positions)  # per layer ([Tc, nKV, hd]) x2
        slots = batch.attn_metadata.slot_mapping
        for (k, v), (k_cache, v_cache) in zip(kv, self.runner.kv_caches, strict=True):
            self.runner.attn_backend.write_kv(k, v, k_cache, v_cache, slots)

    def _draft_block(
        self,
        items: Sequence[ProposeItem],
        active: list[int],
        drafts: list[list[int]],
        probs: list[list[torch.Tensor]],
        *,
        parallel: bool,
    ) -> None:
        """One block forward for ``active``: every mask slot (parallel) or the last (sequential)."""
        deltas: list[Delta] = []
        slots: list[list[int]] = []
        for b in active:
            d, k = items[b].delta, items[b].num_draft
            n_mask = k if parallel else 1
            block = [d.token_ids[-1], *drafts[b], *[self.mask_token_id] * n_mask]
            deltas.append(Delta(d.seq_id, d.end_pos - 1, block))
            slots.append(list(range(len(block) - n_mask, len(block))))
        batch = self.runner.prepare(deltas, causal=self.causal)
        out = self.runner.forward(batch)
        assert out.hidden_states is not None
        q_start = batch.query_start_loc
        rows = [q_start[j] + s for j, ss in enumerate(slots) for s in ss]
        logits = self.runner.compute_logits(select_rows(out.hidden_states, rows))  # [R, Vt]
        row_seq = [b for b, ss in zip(active, slots, strict=True) for _ in ss]
        tokens, q = self.sampler.pick([items[b].delta.seq_id for b in row_seq], logits)
        for j, b in enumerate(row_seq):
            drafts[b].append(int(tokens[j]))
            if q[j] is not None:
                probs[b].append(q[j])  # type: ignore[arg-type]
