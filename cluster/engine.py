"""The propose -> verify round over a continuously batched set of sequences.

``EngineCore`` is written against two small interfaces, a target that verifies and a drafter
that proposes. In one process these are the worker objects themselves; the Serve router
drives the same rounds over gRPC clients.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Generator
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from outrider.cluster.detokenizer import Detokenizer
from outrider.cluster.scheduler import Scheduler
from outrider.cluster.sequence import SeqStatus, Sequence, SpecStats
from outrider.workers.config import SamplingParams
from outrider.workers.proposers.base import (
    DrafterCapabilities,
    DraftMode,
    ProposeItem,
    ProposeResult,
)
from outrider.workers.protocol import Delta
from outrider.workers.verifier import VerifyItem, VerifyResult

logger = logging.getLogger(__name__)

Call = tuple[str, tuple[Any, ...]]


class Target(Protocol):
    def verify(self, items: Seq[VerifyItem]) -> VerifyResult: ...
    def release(self, seq_ids: Seq[int]) -> None: ...


class Drafter(Protocol):
    @property
    def capabilities(self) -> DrafterCapabilities: ...
    def propose(self, items: Seq[ProposeItem], mode: DraftMode) -> ProposeResult: ...
    def release(self, seq_ids: Seq[int]) -> None: ...


@dataclass
class StepOutput:
    seq: Sequence
    new_token_ids: list[int]
    new_text: str
    finished: bool
    spec: tuple[int, int] | None = None  # (num_draft, num_accepted) when the round drafted


@dataclass
class EngineStats:
    spec: SpecStats = field(default_factory=SpecStats)
    num_rounds: int = 0
    num_generated_tokens: int = 0
    num_preemptions: int = 0


class EngineCore:
    def __init__(
        self,
        target: Target,
        detokenizer: Detokenizer,
        scheduler: Scheduler,
        *,
        drafter: Drafter | None = None,
        num_speculative_tokens: int = 0,
        max_model_len: int,
        synthetic: bool = False,
    ) -> None:
        self.target = target
        self.drafter = drafter
        self.detok = detokenizer
        self.scheduler = scheduler
        self.k = num_speculative_tokens if drafter is not None else 0
        self.max_model_len = max_model_len
        # NOTE: drafts are accepted at synthetic rates (benchmarks); labelled in metrics.
        self.synthetic = synthetic and self.k > 0
        self.stats = EngineStats()
        self._ids = itertools.count()
        self._aborted: list[Sequence] = []
        caps = drafter.capabilities if drafter is not None else None
        self.mode: DraftMode = "parallel" if caps and caps.parallel_drafting else "sequential"
        self.needs_hidden = bool(caps and caps.needs_target_hidden_states)
        if caps is not None and caps.fallback_reason:
            logger.warning("drafter %s drafts sequentially: %s", caps.method, caps.fallback_reason)

    # -- requests ---------------------------------------------------------------------------
    def add_request(self, prompt_token_ids: list[int], params: SamplingParams) -> Sequence:
        seq = Sequence(next(self._ids), list(prompt_token_ids), params)
        self.scheduler.add(seq)
        return seq

    def abort(self, seq: Sequence) -> None:
        """Drop a request; its KV is freed at the start of the next round."""
        if seq.is_finished:
            return
        self.scheduler.remove(seq)
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = "abort"
        self._aborted.append(seq)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._aborted)

    @staticmethod
    def _release_ids(seqs: Seq[Sequence]) -> list[int]:
        # NOTE: released unconditionally: a request aborted mid-prefill holds KV before its
        # cursors move, and releasing an unknown sequence is a no-op on the workers.
        return [s.seq_id for s in seqs]

    # -- one round ----------------------------------------------------------------------------
    def _num_draft(self, seq: Sequence) -> int:
        if self.k == 0 or seq.target_len == 0:
            return 0
        room_tokens = seq.params.max_tokens - seq.num_output_tokens - 1
        room_len = self.max_model_len - len(seq.token_ids) - 1
        return max(0, min(self.k, room_tokens, room_len))

    def _propose_items(self, seqs: list[Sequence], ks: list[int]) -> list[ProposeItem]:
        items = []
        for seq, k in zip(seqs, ks, strict=True):
            delta = Delta(seq.seq_id, seq.draft_len, seq.token_ids[seq.draft_len :])
            hidden = None
            if self.needs_hidden:
                parts = seq.pending_hidden or []
                assert isinstance(parts, list)
                hidden = torch.cat(parts) if len(parts) > 1 else (parts[0] if parts else None)
            items.append(ProposeItem(delta, k, hidden, seq.params if seq.draft_len == 0 else None))
        return items

    def round(self) -> Generator[Call, Any, list[StepOutput]]:
        """One round as a coroutine of calls: yields ("release" | "propose" | "verify", args)
        and receives each call's result, so sync and async drivers share this logic."""
        batch = self.scheduler.schedule()
        dropped = [*self._aborted, *batch.preempted]
        self._aborted = []
        if batch.preempted:
            self.stats.num_preemptions += len(batch.preempted)
        ids = self._release_ids(dropped)
        if ids:
            yield ("release", (ids,))
        for seq in dropped:
            seq.target_len = seq.draft_len = 0
            seq.pending_hidden = None
        seqs = batch.seqs
        if not seqs:
            return []
        ks = [self._num_draft(s) for s in seqs]
        drafts: list[list[int]] = [[] for _ in seqs]
        probs: list[torch.Tensor | None] = [None for _ in seqs]
        # NOTE: a sequence whose prefill finished proposes too (k may be 0): the drafter must
        # ingest every confirmed token to stay in step with the target.
        idx = [i for i, s in enumerate(seqs) if s.target_len > 0] if self.drafter else []
        if idx:
            items = self._propose_items([seqs[i] for i in idx], [ks[i] for i in idx])
            res: ProposeResult = yield ("propose", (items, self.mode))
            for seq in (seqs[i] for i in idx):
                seq.draft_len = len(seq.token_ids)
                seq.pending_hidden = None
            for j, i in enumerate(idx):
                drafts[i] = res.draft_token_ids[j][: ks[i]]
                if res.draft_probs:
                    probs[i] = res.draft_probs[j]
        items_v = [
            VerifyItem(
                Delta(s.seq_id, s.target_len, s.token_ids[s.target_len :]),
                drafts[i],
                probs[i],
                s.params if s.target_len == 0 else None,
            )
            for i, s in enumerate(seqs)
        ]
        result: VerifyResult = yield ("verify", (items_v,))
        self.stats.num_rounds += 1
        outputs, finished = self._apply(seqs, items_v, result)
        ids = self._release_ids(finished)
        if ids:
            yield ("release", (ids,))
        return outputs

    def _call(self, call: Call) -> Any:
        kind, args = call
        if kind == "verify":
            return self.target.verify(*args)
        if kind == "propose":
            assert self.drafter is not None
            return self.drafter.propose(*args)
        self.target.release(*args)
        if self.drafter is not None:
            self.drafter.release(*args)
        return None

    @staticmethod
    def _emit_text(seq: Sequence) -> str:
        """Text that is final: while a stop string could still complete, its possible prefix
        (up to len(longest stop) - 1 characters) is held back from streaming."""
        hold = 0 if seq.is_finished or not seq.params.stop else max(map(len, seq.params.stop)) - 1
        end = max(seq.text_emitted, len(seq.text) - hold)
        out = seq.text[seq.text_emitted : end]
        seq.text_emitted = end
        return out

    def step(self) -> list[StepOutput]:
        """Run one round, calling the target and drafter directly."""
        gen = self.round()
        try:
            call = next(gen)
            while True:
                call = gen.send(self._call(call))
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]

    def _apply(
        self, seqs: list[Sequence], items: list[VerifyItem], result: VerifyResult
    ) -> tuple[list[StepOutput], list[Sequence]]:
        outputs: list[StepOutput] = []
        finished: list[Sequence] = []
        row = 0
        for i, seq in enumerate(seqs):
            item = items[i]
            n_acc = result.num_accepted[i]
            if seq.finish_reason == "abort":
                # NOTE: aborted mid-round: its KV is released with the aborted batch.
                if result.hidden_states is not None and self.needs_hidden:
                    row += result.hidden_rows[i]
                continue
            seq.stats.record(len(item.draft_token_ids), n_acc)
            self.stats.spec.record(len(item.draft_token_ids), n_acc)
            seq.target_len += len(item.delta.token_ids) + n_acc
            if result.hidden_states is not None and self.needs_hidden:
                rows = result.hidden_rows[i]
                part = result.hidden_states[row : row + rows]
                row += rows
                pending = seq.pending_hidden or []
                assert isinstance(pending, list)
                seq.pending_hidden = [*pending, part]
            new = result.output_token_ids[i]
            kept = self.detok.append(seq, new)
            if seq.is_finished:
                self.detok.flush(seq)
                finished.append(seq)
            new_text = self._emit_text(seq)
            self.stats.num_generated_tokens += kept
            n_draft = len(item.draft_token_ids)
            outputs.append(
                StepOutput(
                    seq,
                    new[:kept],
                    new_text,
                    seq.is_finished,
                    (n_draft, n_acc) if n_draft else None,
                )
            )
        for seq in finished:
            self.scheduler.remove(seq)
        return outputs, finished
