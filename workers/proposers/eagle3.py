"""EAGLE-3 and P-EAGLE drafting from a speculators-format checkpoint.

Draft KV layout per sequence (spec §4.3c): entry i holds token x_{i+1} with the target's fused
hidden g_i at position i. A delta (start s, tokens x_s.., hidden rows g_{s-1}..) therefore
becomes the runner delta ``(max(s - 1, 0), tokens[1:] if s == 0 else tokens)``; the last entry's
output gives draft 1.

Sequential (EAGLE-3, and P-EAGLE's fallback): steps 2..k feed the previous draft token with the
previous step's fed-back hidden at the next position, one token per forward.
Parallel (P-EAGLE): one forward over the context entries plus k - 1 mask entries (token
``mask_token_id``, hidden ``fc(mask_hidden)``, consecutive positions, causal attention) yields
all k drafts.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import torch

from outrider.workers.config import ConfigError, ModelConfig, WorkerConfig
from outrider.workers.distributed import get_pp_group, get_tp_group
from outrider.workers.forward_context import ForwardContext, forward_context
from outrider.workers.models.eagle3 import Eagle3DraftModel, load_eagle3_model
from outrider.workers.models.target_tensors import shared_reader
from outrider.workers.proposers.base import (
    DrafterCapabilities,
    DraftMode,
    ProposeItem,
    Proposer,
    ProposeResult,
)
from outrider.workers.proposers.context_graph import DraftContextGraphs
from outrider.workers.proposers.draft_graph import DraftStepGraphs
from outrider.workers.proposers.drafting import DraftSampler
from outrider.workers.protocol import Delta
from outrider.workers.runner import ModelRunner, PreparedBatch, on_runner_device
from outrider.workers.spec_config import SpeculativeConfig
from outrider.workers.speculators import load_for_target
from outrider.workers.staging import select_rows

logger = logging.getLogger(__name__)

MAX_K = 32


def parallel_blocker(runner: ModelRunner) -> str | None:
    """Why this worker cannot draft P-EAGLE in parallel (None when it can)."""
    # NOTE: the mask entries need only causal multi-token queries, which every backend runs.
    if runner.cfg.parallel.pipeline_parallel_size > 1:
        return "pipeline_parallel"
    return None


class Eagle3Proposer(Proposer):
    method = "eagle3"

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
        self.ckpt = ckpt = load_for_target(spec.model, "eagle3", target_vocab_size)
        self.aux_layer_ids = ckpt.resolved_aux_layer_ids(target_num_layers)
        wants = ckpt.parallel_drafting if spec.parallel_drafting is None else spec.parallel_drafting
        if wants and ckpt.mask_token_id is None:
            raise ConfigError(
                f"`speculative.parallel_drafting` needs a P-EAGLE checkpoint; {ckpt.path} has "
                "no `mask_token_id`"
            )
        self.mask_token_id = ckpt.mask_token_id

        def build(device: torch.device, dtype: torch.dtype, moe_backend: str) -> tuple[Any, Any]:
            return load_eagle3_model(
                ckpt,
                num_aux=len(self.aux_layer_ids),
                device=device,
                dtype=dtype,
                shared=shared_reader(
                    target_model.path if target_model is not None else None,
                    use_target=target_model is not None,
                ),
                require_mask_hidden=wants,
            )

        self.runner = ModelRunner(wcfg, group="drafter", build=build)
        self.model: Eagle3DraftModel = self.runner.model  # type: ignore[assignment]
        reason = parallel_blocker(self.runner) if wants else None
        if ckpt.parallel_drafting and not wants:
            reason = "parallel_drafting_disabled"
        self._parallel = wants and reason is None
        self._fallback = reason
        if reason is not None:
            logger.warning(
                "%s drafter %s drafts sequentially: %s", ckpt.model_type, ckpt.path, reason
            )
        self.sampler = DraftSampler(
            self.runner.device, draft_sampling=spec.draft_sampling, vocab_size=target_vocab_size
        )
        self.step_graphs: DraftStepGraphs | None = None
        self.context_graphs: DraftContextGraphs | None = None
        if self._graphs_possible():
            kernels, k = self.runner.cfg.kernels, self.spec.num_speculative_tokens or 1
            self.step_graphs = DraftStepGraphs(
                self.runner,
                self.model,
                batch_sizes=kernels.cuda_graph_batch_sizes,
                max_steps=MAX_K - 1,
                usual_steps=k - 1,
            )
            # NOTE: steady contexts: what a round confirmed (<= k + 1), plus k - 1 mask slots
            # when drafting in parallel; one picked row per sequence, or k in parallel.
            self.context_graphs = DraftContextGraphs(
                self.runner,
                self.model,
                batch_sizes=kernels.cuda_graph_batch_sizes,
                max_query_len=2 * k if self._parallel else k + 1,
                rows=k if self._parallel else 1,
            )

    def _graphs_possible(self) -> bool:
        """Whether this worker can capture CUDA graphs of its draft steps and contexts.

        NOTE: ``OUTRIDER_DRAFT_GRAPHS=0`` turns them off (the eager loop, for comparisons).
        """
        runner, kernels = self.runner, self.runner.cfg.kernels
        if runner.device.type != "cuda" or kernels.enforce_eager:
            return False
        if os.environ.get("OUTRIDER_DRAFT_GRAPHS", "1") == "0":
            return False
        if not getattr(runner.attn_backend, "cuda_graph_safe", False):
            return False
        return get_pp_group().size == 1 and get_tp_group().size == 1

    @property
    def capabilities(self) -> DrafterCapabilities:
        return DrafterCapabilities(
            method=self.ckpt.model_type,
            parallel_drafting=self._parallel,
            needs_target_hidden_states=True,
            aux_layer_ids=self.aux_layer_ids,
            max_k=MAX_K,
            fallback_reason=self._fallback,
        )

    def kv_usage(self) -> dict[str, int]:
        return self.runner.kv_usage()

    @property
    def num_graphs(self) -> int:
        return sum(g.num_graphs for g in (self.step_graphs, self.context_graphs) if g is not None)

    def release(self, seq_ids: Sequence[int]) -> None:
        for s in seq_ids:
            self.sampler.release(s)
        self.runner.release(seq_ids)

    # -- one round --------------------------------------------------------------------------
    def _forward(
        self, deltas: list[Delta], hidden: torch.Tensor
    ) -> tuple[PreparedBatch, torch.Tensor, torch.Tensor]:
        batch = self.runner.prepare(deltas)
        ctx = ForwardContext(batch.attn_metadata, self.runner.kv_caches, self.runner.attn_backend)
        with forward_context(ctx):
            z, fed = self.model(batch.input_ids, batch.positions, hidden)
        return batch, z, fed  # [T, H] x2

    def _context(self, it: ProposeItem) -> Delta:
        """The runner delta of an item: entries from position max(s - 1, 0)."""
        d = it.delta
        rows = d.num_hidden_rows
        hs = it.hidden_states
        if rows > 0 and (hs is None or hs.shape[0] != rows):
            got = None if hs is None else hs.shape[0]
            raise ValueError(
                f"sequence {d.seq_id}: delta at {d.start_pos} with {len(d.token_ids)} tokens "
                f"needs {rows} target hidden-state rows, got {got}"
            )
        width = self.model.fc.input_size
        if hs is not None and rows > 0 and (hs.dim() != 2 or hs.shape[1] != width):
            raise ValueError(
                f"sequence {d.seq_id}: target hidden rows have shape {tuple(hs.shape)}, "
                f"expected [{rows}, {width}] (aux layers {self.aux_layer_ids})"
            )
        tokens = d.token_ids[1:] if d.start_pos == 0 else d.token_ids
        if not tokens and it.num_draft > 0:
            raise ValueError(f"sequence {d.seq_id}: nothing to draft from (no token after 0)")
        return Delta(d.seq_id, max(d.start_pos - 1, 0), tokens)

    def _fused_rows(self, items: Sequence[ProposeItem]) -> list[torch.Tensor]:
        """fc(aux rows) per item: [rows_b, H]."""
        dev = self.runner.device
        parts = [
            it.hidden_states.to(dev)
            for it in items
            if it.hidden_states is not None and it.delta.num_hidden_rows > 0
        ]
        sizes = [it.delta.num_hidden_rows if it.hidden_states is not None else 0 for it in items]
        if not parts:
            return [self._empty_hidden() for _ in items]
        fused = self.model.fuse(torch.cat(parts))  # [sum rows, H]
        return list(fused.split(sizes))

    def _empty_hidden(self) -> torch.Tensor:
        h = self.model.config.hidden_size
        return torch.empty(0, h, dtype=self.runner.dtype, device=self.runner.device)

    @on_runner_device
    @torch.inference_mode()
    def propose(self, items: Sequence[ProposeItem], mode: DraftMode) -> ProposeResult:
        for it in items:
            self.sampler.register(it.delta.seq_id, it.params)
        parallel = mode == "parallel" and self._parallel
        contexts = [self._context(it) for it in items]
        fused = self._fused_rows(items)
        live = [b for b, c in enumerate(contexts) if c.token_ids]
        deltas: list[Delta] = []
        hidden: list[torch.Tensor] = []
        rows: list[list[int]] = []
        for b in live:
            c, k = contexts[b], items[b].num_draft
            n = len(c.token_ids)
            if parallel and k > 1:
                assert self.mask_token_id is not None and self.model.mask_fused is not None
                deltas.append(
                    Delta(c.seq_id, c.start_pos, c.token_ids + [self.mask_token_id] * (k - 1))
                )
                hidden += [fused[b], self.model.mask_fused.expand(k - 1, -1)]
                rows.append(list(range(n - 1, n - 1 + k)))
            else:
                deltas.append(c)
                hidden.append(fused[b])
                rows.append([n - 1] if k > 0 else [])
        drafts: list[list[int]] = [[] for _ in items]
        probs: list[list[torch.Tensor]] = [[] for _ in items]
        if not deltas:
            return ProposeResult(drafts, [None for _ in items])
        graphed = self._graph_round(items, contexts, deltas, hidden, rows, parallel)
        if graphed is not None:
            return ProposeResult(graphed, [None for _ in items])
        batch, z, fed = self._forward(deltas, torch.cat(hidden))
        starts = batch.query_start_loc
        flat = [starts[i] + r for i, rs in enumerate(rows) for r in rs]
        owners = [live[i] for i, rs in enumerate(rows) for _ in rs]
        seq_of = [it.delta.seq_id for it in items]
        steps = max((it.num_draft for it in items), default=0) - 1
        graphed = self._graph_steps(items, contexts, live, rows, flat, z, fed, starts, steps)
        if graphed is not None:
            for i, b in enumerate(live):
                drafts[b] = graphed[i]
            return ProposeResult(drafts, [None for _ in items])
        if flat:
            logits = self.model.compute_logits(select_rows(z, flat))  # [R, Vt]
            self._pick_into(owners, seq_of, logits, drafts, probs)
        # sequential steps 2..k: one token per forward for sequences that still need drafts
        last = {b: fed[starts[i] + len(contexts[b].token_ids) - 1] for i, b in enumerate(live)}
        ends = {b: contexts[b].end_pos for b in live}
        for step in range(1, max((it.num_draft for it in items), default=0)):
            active = [b for b in live if len(drafts[b]) < items[b].num_draft]
            if not active:
                break
            step_deltas = [Delta(seq_of[b], ends[b] + step - 1, [drafts[b][-1]]) for b in active]
            _, z, fed = self._forward(step_deltas, torch.stack([last[b] for b in active]))
            logits = self.model.compute_logits(z)  # [B_active, Vt]
            self._pick_into(active, seq_of, logits, drafts, probs)
            for j, b in enumerate(active):
                last[b] = fed[j]
        return ProposeResult(drafts, [torch.stack(p) if p else None for p in probs])

    def _greedy_k(self, items: Sequence[ProposeItem]) -> int:
        """The k every sequence drafts when they all draft it greedily (what the graphs take),
        else 0."""
        k = items[0].num_draft if items else 0
        if any(it.num_draft != k for it in items):
            return 0
        if any(self.sampler.samples(it.delta.seq_id) for it in items):
            return 0
        return max(k, 0)

    def _graph_round(
        self,
        items: Sequence[ProposeItem],
        contexts: list[Delta],
        deltas: list[Delta],
        hidden: list[torch.Tensor],
        rows: list[list[int]],
        parallel: bool,
    ) -> list[list[int]] | None:
        """Every sequence's greedy drafts with the context forward replayed as a CUDA graph (and
        steps 2..k as another, one read at the end), or None when the round needs the eager
        forward (sampled drafts, mixed k, a sequence with nothing to draft, a long context)."""
        graphs = self.context_graphs
        if graphs is None or len(deltas) != len(items):
            return None
        k = self._greedy_k(items)
        if k == 0:
            return None
        steps = 0 if parallel else k - 1
        step_graphs = self.step_graphs
        if steps and (step_graphs is None or step_graphs.fits(len(items), steps) is None):
            return None
        if graphs.fits(deltas) is None:
            return None
        out = graphs.run(deltas, torch.cat(hidden), rows)
        if out is None:
            return None
        tokens, fed = out  # [n * R], [n, H]
        if steps:
            assert step_graphs is not None
            return step_graphs.run(
                [d.seq_id for d in contexts], [d.end_pos for d in contexts], tokens, fed, steps
            )
        r = graphs.rows
        return [row[:k] for row in tokens.view(len(items), r).tolist()]  # NOTE: the one sync

    def _graph_steps(
        self,
        items: Sequence[ProposeItem],
        contexts: list[Delta],
        live: list[int],
        rows: list[list[int]],
        flat: list[int],
        z: torch.Tensor,  # [T, H] the context forward's outputs
        fed: torch.Tensor,  # [T, H]
        starts: list[int],
        steps: int,
    ) -> list[list[int]] | None:
        """Every live sequence's k greedy drafts with steps 2..k replayed as one CUDA graph, or
        None when this round needs the eager loop (sampled drafts, mixed k, parallel mode)."""
        graphs = self.step_graphs
        if graphs is None or steps < 1 or len(live) != len(items):
            return None
        if self._greedy_k(items) != steps + 1 or any(len(r) != 1 for r in rows):
            return None
        if graphs.fits(len(live), steps) is None:
            return None
        tokens = self.model.compute_logits(select_rows(z, flat)).argmax(dim=-1)  # [n]
        idx = [starts[i] + len(contexts[b].token_ids) - 1 for i, b in enumerate(live)]
        return graphs.run(
            [contexts[b].seq_id for b in live],
            [contexts[b].end_pos for b in live],
            tokens,
            select_rows(fed, idx),
            steps,
        )

    def _pick_into(
        self,
        owners: list[int],
        seq_of: list[int],
        logits: torch.Tensor,  # [R, Vt]
        drafts: list[list[int]],
        probs: list[list[torch.Tensor]],
    ) -> None:
        tokens, q = self.sampler.pick([seq_of[b] for b in owners], logits)
        for j, b in enumerate(owners):
            drafts[b].append(int(tokens[j]))
            if q[j] is not None:
                probs[b].append(q[j])  # type: ignore[arg-type]
