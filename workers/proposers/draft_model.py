"""Draft-model drafting: any causal LM the engine loads, dense or MoE, on its own runner.

Sequential: one forward ingests the delta and yields draft 1, then k - 1 one-token forwards.
Parallel (PARD): one forward over [delta, mask x (k - 1)] yields all k drafts at once; it needs
a model trained for it and its mask token id (``pard_token`` / ``mask_token_id`` in the
draft's config.json, as vLLM reads it).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from outrider.workers.config import ConfigError
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
from outrider.workers.staging import select_rows


def pard_token_id(hf_config: object) -> int | None:
    for key in ("pard_token", "mask_token_id"):
        value = getattr(hf_config, key, None)
        if isinstance(value, int):
            return value
    return None


class DraftModelProposer(Proposer):
    method = "draft_model"

    def __init__(
        self, spec: SpeculativeConfig, runner: ModelRunner, *, target_vocab_size: int
    ) -> None:
        self.spec = spec
        self.runner = runner
        self.k = spec.num_speculative_tokens or 1
        vocab = runner.hf_config.vocab_size
        if vocab > target_vocab_size:
            raise ConfigError(
                f"draft model vocabulary ({vocab}) is larger than the target's "
                f"({target_vocab_size}); the two must share a tokenizer"
            )
        self.sampler = DraftSampler(
            runner.device, draft_sampling=spec.draft_sampling, vocab_size=target_vocab_size
        )
        self.mask_token_id = pard_token_id(runner.hf_config)
        self._fallback: str | None = None
        self._parallel = bool(spec.parallel_drafting)
        if self._parallel and self.mask_token_id is None:
            raise ConfigError(
                "`speculative.parallel_drafting` needs a PARD-trained draft model: its "
                "config.json has no `pard_token` or `mask_token_id`"
            )
        if self._parallel and runner.cfg.parallel.pipeline_parallel_size > 1:
            self._parallel = False
            self._fallback = "pipeline_parallel"

    @property
    def capabilities(self) -> DrafterCapabilities:
        return DrafterCapabilities(
            method=self.method,
            parallel_drafting=self._parallel,
            max_k=32,
            fallback_reason=self._fallback,
        )

    def kv_usage(self) -> dict[str, int]:
        return self.runner.kv_usage()

    @property
    def num_graphs(self) -> int:
        graphs = self.runner.graph_runner
        return 0 if graphs is None else graphs.num_graphs

    def release(self, seq_ids: Sequence[int]) -> None:
        for s in seq_ids:
            self.sampler.release(s)
        self.runner.release(seq_ids)

    def _logits_at(self, deltas: list[Delta], rows_per_seq: list[list[int]]) -> torch.Tensor:
        batch = self.runner.prepare(deltas)
        out = self.runner.forward(batch)
        assert out.hidden_states is not None
        rows = [batch.query_start_loc[b] + r for b, rs in enumerate(rows_per_seq) for r in rs]
        return self.runner.compute_logits(select_rows(out.hidden_states, rows))

    @on_runner_device
    @torch.inference_mode()
    def propose(self, items: Sequence[ProposeItem], mode: DraftMode) -> ProposeResult:
        for it in items:
            self.sampler.register(it.delta.seq_id, it.params)
        seq_ids = [it.delta.seq_id for it in items]
        drafts: list[list[int]] = [[] for _ in items]
        probs: list[list[torch.Tensor]] = [[] for _ in items]
        parallel = mode == "parallel" and self._parallel
        deltas: list[Delta] = []
        rows: list[list[int]] = []
        for it in items:
            n = len(it.delta.token_ids)
            if parallel and it.num_draft > 1:
                assert self.mask_token_id is not None
                masks = [self.mask_token_id] * (it.num_draft - 1)
                deltas.append(
                    Delta(it.delta.seq_id, it.delta.start_pos, it.delta.token_ids + masks)
                )
                rows.append(list(range(n - 1, n - 1 + it.num_draft)))
            else:
                deltas.append(it.delta)
                rows.append([n - 1] if it.num_draft > 0 else [])
        logits = self._logits_at(deltas, rows)
        row_seq = [b for b, rs in enumerate(rows) for _ in rs]
        tokens, q = self.sampler.pick([seq_ids[b] for b in row_seq], logits)
        for j, b in enumerate(row_seq):
            drafts[b].append(int(tokens[j]))
            if q[j] is not None:
                probs[b].append(q[j])  # type: ignore[arg-type]
        # sequential steps 2..k: one token per forward for sequences that still need drafts
        for step in range(1, max((it.num_draft for it in items), default=0)):
            active = [b for b, it in enumerate(items) if len(drafts[b]) < it.num_draft]
            if not active:
                break
            step_deltas = [
                Delta(seq_ids[b], items[b].delta.end_pos + step - 1, [drafts[b][-1]])
                for b in active
            ]
            logits = self._logits_at(step_deltas, [[0] for _ in active])
            tokens, q = self.sampler.pick([seq_ids[b] for b in active], logits)
            for j, b in enumerate(active):
                drafts[b].append(int(tokens[j]))
                if q[j] is not None:
                    probs[b].append(q[j])  # type: ignore[arg-type]
        out_probs = [torch.stack(p) if p else None for p in probs]
        return ProposeResult(drafts, out_probs)
