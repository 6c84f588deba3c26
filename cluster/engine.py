"""The propose -> verify round over a continuously batched set of sequences.

``EngineCore`` is written against two small interfaces, a target that verifies and a drafter
that proposes. In one process these are the worker objects themselves; the Serve router
drives the same rounds over gRPC clients.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Generator
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from outrider.cluster.detokenizer import Detokenizer
from outrider.cluster.draft_length import DraftLengthPolicy, FixedDraftLength
from outrider.cluster.overlap import ahead_items_for, settle_ahead, take_prepared
from outrider.cluster.round_stats import EngineStats, RoundTiming
from outrider.cluster.scheduler import Scheduler
from outrider.cluster.sequence import SeqStatus, Sequence
from outrider.workers.config import ConfigError, SamplingParams
from outrider.workers.proposers.base import (
    DrafterCapabilities,
    DraftMode,
    ProposeItem,
    Proposer,
    ProposeResult,
    timed_propose,
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
        draft_length: DraftLengthPolicy | None = None,
        overlap: bool = False,
        concurrent_overlap: bool = False,
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
        self.last_timing = RoundTiming()
        self.policy: DraftLengthPolicy = draft_length or FixedDraftLength(self.k)
        self._ids = itertools.count()
        self._aborted: list[Sequence] = []
        caps = drafter.capabilities if drafter is not None else None
        self.mode: DraftMode = "parallel" if caps and caps.parallel_drafting else "sequential"
        self.needs_hidden = bool(caps and caps.needs_target_hidden_states)
        self.overlap = overlap and self.k > 0
        # NOTE: whether the driver runs an overlap's two calls at the same time (the Serve
        # router does, over gRPC); step() runs them in turn.
        self.concurrent_overlap = concurrent_overlap
        if self.overlap and self.needs_hidden:
            assert caps is not None
            raise ConfigError(
                f"`speculative.overlap` needs a drafter that drafts without the target's hidden "
                f"states; {caps.method} needs them (use overlap: false)"
            )
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
    def _num_draft(self, seq: Sequence, k: int) -> int:
        if k == 0 or seq.target_len == 0:
            return 0
        room_tokens = seq.params.max_tokens - seq.num_output_tokens - 1
        room_len = self.max_model_len - len(seq.token_ids) - 1
        return max(0, min(k, room_tokens, room_len))

    def _choose_k(self, seqs: list[Sequence]) -> int:
        if self.k == 0 or self.drafter is None:
            return 0
        decode = [s for s in seqs if s.target_len > 0]
        other = sum(len(s.token_ids) for s in seqs if s.target_len == 0)
        return min(self.policy.choose(len(decode), other), self.k)

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
        """One round as a coroutine of calls: yields ("release" | "propose" | "verify" |
        "overlap", args) and receives each call's result, so sync and async drivers share
        this logic. "overlap" is a verify and a propose to run at the same time; its result is
        the pair (VerifyResult, ProposeResult)."""
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
            seq.prepared_draft_ids = seq.prepared_draft_probs = None
        seqs = batch.seqs
        if not seqs:
            return []
        t_start = time.perf_counter()
        k = self._choose_k(seqs)
        ks = [self._num_draft(s, k) for s in seqs]
        timing = RoundTiming(k=max(ks), num_seqs=len(seqs))
        drafts: list[list[int]] = [[] for _ in seqs]
        probs: list[torch.Tensor | None] = [None for _ in seqs]
        if self.overlap:
            cold = take_prepared(seqs, ks, drafts, probs)
        else:
            # NOTE: a sequence whose prefill finished proposes too (its k may be 0): the drafter
            # ingests every confirmed token while drafting is on. With k = 0 for the whole
            # round the drafter is not called; its next delta catches it up from draft_len.
            cold = [i for i, s in enumerate(seqs) if s.target_len > 0] if k else []
        critical_s = 0.0
        if cold:
            items = self._propose_items([seqs[i] for i in cold], [ks[i] for i in cold])
            t0 = time.perf_counter()
            res: ProposeResult = yield ("propose", (items, self.mode))
            dt = time.perf_counter() - t0
            if not res.captured_graphs:
                self.policy.observe_draft(
                    max(ks[i] for i in cold), sum(ks[i] for i in cold), dt, self._ingested(items)
                )
            timing.draft_s += res.forward_s or dt
            timing.captured_graphs |= res.captured_graphs
            critical_s += res.forward_s or dt
            for seq in (seqs[i] for i in cold):
                seq.draft_len = len(seq.token_ids)
                seq.pending_hidden = None
            for j, i in enumerate(cold):
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
        num_tokens = sum(len(it.delta.token_ids) + len(it.draft_token_ids) for it in items_v)
        timing.num_tokens = num_tokens
        # NOTE: only rounds without a prefill fit the policy's cost model (a prefill costs with
        # its length, which the model leaves out: fitted in, every round looks dearer).
        steady = all(len(it.delta.token_ids) <= self.k + 1 for it in items_v)
        ahead_idx, ahead_items = (
            ahead_items_for(seqs, drafts, k, self.max_model_len)
            if self.overlap and self.drafter is not None
            else ([], [])
        )
        t0 = time.perf_counter()
        ahead: ProposeResult | None = None
        if ahead_items:
            result, ahead = yield ("overlap", (items_v, ahead_items, self.mode))
            assert ahead is not None
            dt = time.perf_counter() - t0
            fw_v, fw_a = result.forward_s or dt, ahead.forward_s or dt
            # NOTE: the cost model takes call times; each call here is credited its forward
            # time plus the part of the wall time neither forward explains (the round trip).
            trip = max(dt - (max(fw_v, fw_a) if self.concurrent_overlap else fw_v + fw_a), 0.0)
            if steady and not result.captured_graphs:
                self.policy.observe_verify(num_tokens, fw_v + trip)
            if not ahead.captured_graphs:
                self.policy.observe_draft(
                    max(it.num_draft for it in ahead_items),
                    sum(it.num_draft for it in ahead_items),
                    fw_a + trip,
                    self._ingested(ahead_items),
                )
            timing.verify_s += fw_v
            timing.draft_s += fw_a
            timing.captured_graphs |= result.captured_graphs or ahead.captured_graphs
            critical_s += max(fw_v, fw_a) if self.concurrent_overlap else fw_v + fw_a
        else:
            result = yield ("verify", (items_v,))
            dt = time.perf_counter() - t0
            if steady and not result.captured_graphs:
                self.policy.observe_verify(num_tokens, dt)
            timing.verify_s += result.forward_s or dt
            timing.captured_graphs |= result.captured_graphs
            critical_s += result.forward_s or dt
        self.stats.num_rounds += 1
        lens = [len(s.token_ids) for s in seqs]
        outputs, finished = self._apply(seqs, items_v, result)
        if ahead is not None:
            timing.overlap_hits, timing.overlap_misses = settle_ahead(
                seqs, lens, drafts, result, ahead_idx, ahead
            )
        self.policy.observe_acceptance(
            [
                (len(it.draft_token_ids), n)
                for it, n in zip(items_v, result.num_accepted, strict=True)
                if it.draft_token_ids
            ]
        )
        ids = self._release_ids(finished)
        if ids:
            yield ("release", (ids,))
        timing.wall_s = time.perf_counter() - t_start
        timing.overhead_s = max(timing.wall_s - critical_s, 0.0)
        if steady and not timing.captured_graphs:
            self.policy.observe_round(timing.k, timing.overhead_s)
        self.last_timing = timing
        self.stats.record(timing)
        return outputs

    @staticmethod
    def _ingested(items: Seq[ProposeItem]) -> int:
        """Confirmed tokens a drafter call ingests over the batch (its context length)."""
        return sum(len(it.delta.token_ids) for it in items)

    def _propose(self, items: Seq[ProposeItem], mode: DraftMode) -> ProposeResult:
        assert isinstance(self.drafter, Proposer), "in-process rounds call a Proposer"
        return timed_propose(self.drafter, items, mode)

    def _call(self, call: Call) -> Any:
        """In-process driver: the two calls of "overlap" run one after the other."""
        kind, args = call
        if kind == "verify":
            return self.target.verify(*args)
        if kind == "propose":
            return self._propose(*args)
        if kind == "overlap":
            items_v, items_p, mode = args
            return self.target.verify(items_v), self._propose(items_p, mode)
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
