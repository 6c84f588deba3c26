"""Target side of a round: one forward over [delta + drafts], then lossless acceptance.

Prefill and plain decoding are the same call with no drafts. Per sequence the result is the
accepted drafts followed by one token from the target (the recovered token at the first
rejection, or the bonus token when every draft was accepted), and optionally the target's aux
hidden states for the rows that produced those tokens, which EAGLE-family and DFlash drafters
consume.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from outrider.kernels import registry
from outrider.kernels.sampling.ops import (
    SamplingTensors,
    draw_exponential,
    draw_rejection_randoms,
    exponential_race,
)
from outrider.workers.config import SamplingParams
from outrider.workers.protocol import Delta
from outrider.workers.runner import ModelRunner, on_runner_device
from outrider.workers.staging import select_rows
from outrider.workers.synthetic import (
    check_rates,
    conditional_rates,
    draw_synthetic_uniforms,
    synthetic_accept,
    synthetic_generator,
)

logger = logging.getLogger(__name__)

Verification = Literal["strict", "probabilistic", "synthetic"]

_warned_synthetic = False


def _warn_synthetic_once(rates: Sequence[float]) -> None:
    global _warned_synthetic
    if not _warned_synthetic:
        _warned_synthetic = True
        logger.warning(
            "synthetic acceptance is on (rates %s): drafts are accepted at random, so the output "
            "is not the model's; use it for benchmarks only",
            [round(r, 4) for r in rates],
        )


@dataclass
class VerifyItem:
    delta: Delta
    draft_token_ids: list[int] = field(default_factory=list)
    draft_probs: torch.Tensor | None = None  # [k, V] the drafter's q for each draft token
    # NOTE: required on a sequence's first call; later calls reuse the stored params.
    params: SamplingParams | None = None


@dataclass
class VerifyResult:
    output_token_ids: list[list[int]]
    num_accepted: list[int]
    # [R, A*H] rows for seq b: len(delta_b) + num_accepted_b, in batch order; None if unused
    hidden_states: torch.Tensor | None = None
    hidden_rows: list[int] = field(default_factory=list)
    forward_s: float = 0.0  # seconds this worker spent in the call (forward and acceptance)
    captured_graphs: bool = False  # the call captured CUDA graphs (one-off time in forward_s)


class Verifier:
    def __init__(
        self,
        runner: ModelRunner,
        *,
        verification: Verification = "probabilistic",
        aux_layer_ids: Sequence[int] = (),
        synthetic_rates: Sequence[float] | None = None,
        num_speculative_tokens: int = 0,
    ) -> None:
        """``num_speculative_tokens``: the most drafts a round verifies; the CUDA graphs of every
        verify length up to it are captured together (0: learnt from the rounds)."""
        self.runner = runner
        self.verification = verification
        self.synthetic_cond: list[float] | None = None
        if verification == "synthetic":
            if synthetic_rates is None:
                raise ValueError("synthetic verification needs synthetic acceptance rates")
            check_rates(synthetic_rates, len(synthetic_rates), "synthetic_acceptance_rates")
            self.synthetic_cond = conditional_rates(synthetic_rates)
            _warn_synthetic_once(synthetic_rates)
        elif synthetic_rates is not None:
            raise ValueError(f"synthetic acceptance rates given with verification {verification!r}")
        self.aux_layer_ids = tuple(sorted(set(aux_layer_ids)))
        self.sampling_backend = registry.resolve("sampling", "auto", runner.device, torch.float32)
        self.sampler = registry.get("sampling", self.sampling_backend)
        self._params: dict[int, SamplingParams] = {}
        self._generators: dict[int, torch.Generator] = {}
        self._synthetic_gens: dict[int, torch.Generator] = {}
        if runner.graph_runner is not None and num_speculative_tokens > 0:
            runner.graph_runner.expect_query_lens(range(1, num_speculative_tokens + 2))

    # -- state per sequence -----------------------------------------------------------------
    def _register(self, item: VerifyItem) -> SamplingParams:
        seq_id = item.delta.seq_id
        if item.params is not None and seq_id not in self._params:
            self._params[seq_id] = item.params
            if item.params.seed is not None:
                gen = torch.Generator(device=self.runner.device)
                gen.manual_seed(item.params.seed % 2**64)
                self._generators[seq_id] = gen
            if self.synthetic_cond is not None:
                self._synthetic_gens[seq_id] = synthetic_generator(seq_id, item.params.seed)
        params = self._params.get(seq_id)
        if params is None:
            raise ValueError(f"sequence {seq_id}: first verify call must carry sampling params")
        return params

    def release(self, seq_ids: Sequence[int]) -> None:
        for seq_id in seq_ids:
            self._params.pop(seq_id, None)
            self._generators.pop(seq_id, None)
            self._synthetic_gens.pop(seq_id, None)
        self.runner.release(seq_ids)

    # -- the round --------------------------------------------------------------------------
    @on_runner_device
    @torch.inference_mode()
    def verify(self, items: Sequence[VerifyItem]) -> VerifyResult:
        t0 = time.perf_counter()
        graphs = self.runner.graph_runner
        num_graphs = 0 if graphs is None else graphs.num_graphs
        params = [self._register(it) for it in items]
        pads = self._padding(items)
        deltas = [
            Delta(
                it.delta.seq_id,
                it.delta.start_pos,
                it.delta.token_ids + it.draft_token_ids + it.delta.token_ids[-1:] * pad,
            )
            for it, pad in zip(items, pads, strict=True)
        ]
        batch = self.runner.prepare(deltas)
        out = self.runner.forward(batch, aux_layer_ids=self.aux_layer_ids)
        q_start = batch.query_start_loc
        num_draft = [len(it.draft_token_ids) for it in items]
        rows = [
            q_start[b] + len(it.delta.token_ids) - 1 + j
            for b, it in enumerate(items)
            for j in range(num_draft[b] + 1)
        ]
        hidden = out.hidden_states
        assert hidden is not None, "verify runs on the last pipeline stage"
        logits = self.runner.compute_logits(select_rows(hidden, rows))  # [sum(k_b + 1), V]
        if all(p.greedy for p in params):
            outputs, accepted = self._accept_greedy(items, num_draft, logits)
        else:
            outputs, accepted = self._accept_tensors(items, params, num_draft, logits)
        result = VerifyResult(outputs, accepted)
        if self.aux_layer_ids:
            aux = torch.cat([out.aux_hidden_states[i] for i in self.aux_layer_ids], dim=-1)
            spans = [
                (q_start[b], q_start[b] + len(it.delta.token_ids) + accepted[b])
                for b, it in enumerate(items)
            ]
            parts = [aux[a:e] for a, e in spans]
            # NOTE: aux is a fresh tensor (not a graph's static output), so a slice may be kept.
            result.hidden_states = parts[0] if len(parts) == 1 else torch.cat(parts)  # [R, A*H]
            result.hidden_rows = [e - a for a, e in spans]
        result.forward_s = time.perf_counter() - t0
        result.captured_graphs = graphs is not None and graphs.num_graphs != num_graphs
        return result

    def _padding(self, items: Sequence[VerifyItem]) -> list[int]:
        """Dummy positions per sequence that give a verify round one query length.

        A round whose drafts were cut short for some sequences (a request near its
        ``max_tokens``) would otherwise have mixed query lengths and run eagerly instead of as a
        CUDA graph. The dummy tokens (the sequence's last token repeated) sit after its drafts,
        so causal attention keeps them out of every real row; their logits are never read, and
        the next delta truncates their K/V. Their positions stay within ``max_model_len`` and
        the ``k + 1`` positions the scheduler reserves per sequence.
        """
        if len(items) < 2 or any(len(it.delta.token_ids) != 1 for it in items):
            return [0] * len(items)
        q = max(1 + len(it.draft_token_ids) for it in items)
        ends = [it.delta.end_pos + q - 1 for it in items]  # tokens cached after the round
        if max(ends) > self.runner.max_model_len:
            return [0] * len(items)
        return [q - 1 - len(it.draft_token_ids) for it in items]

    def _accept_tensors(
        self,
        items: Sequence[VerifyItem],
        params: Sequence[SamplingParams],
        num_draft: Sequence[int],
        logits: torch.Tensor,  # [sum(k_b + 1), V]
    ) -> tuple[list[list[int]], list[int]]:
        """Acceptance on the device: sampled sequences (and greedy ones beside them)."""
        b_total = len(items)
        k_max = max(num_draft, default=0)
        dev = logits.device
        offsets = [0]
        for n in num_draft:
            offsets.append(offsets[-1] + n + 1)
        # [B, K+1] row index into logits for each (seq, position); padding repeats the last row
        gather = torch.tensor(
            [[offsets[b] + min(j, num_draft[b]) for j in range(k_max + 1)] for b in range(b_total)],
            dtype=torch.int64,
            device=dev,
        )
        drafts = torch.full((b_total, max(k_max, 1)), -1, dtype=torch.int64)
        for b, it in enumerate(items):
            if it.draft_token_ids:
                drafts[b, : len(it.draft_token_ids)] = torch.tensor(it.draft_token_ids)
        drafts = drafts[:, :k_max].to(dev)
        n_draft = torch.tensor(num_draft, dtype=torch.int64, device=dev)
        out_tokens = torch.full((b_total, k_max + 1), -1, dtype=torch.int64, device=dev)
        n_acc = torch.zeros(b_total, dtype=torch.int64, device=dev)

        greedy = [b for b, p in enumerate(params) if p.greedy]
        random = [b for b, p in enumerate(params) if not p.greedy]
        if self.synthetic_cond is not None:
            out_tokens, n_acc = self._accept_synthetic(
                items, params, greedy, random, drafts, n_draft, logits, gather
            )
        elif greedy:
            g = torch.tensor(greedy, device=dev)
            target = logits[gather[g]].argmax(dim=-1)  # [Bg, K+1]
            o, n = self.sampler.rejection_sample_strict(drafts[g], n_draft[g], target)
            out_tokens[g], n_acc[g] = o, n
        if random and self.synthetic_cond is None:
            r = torch.tensor(random, device=dev)
            o, n = self._accept_random(
                items, params, random, drafts[r], n_draft[r], logits, gather[r]
            )
            out_tokens[r], n_acc[r] = o, n
        out_list = out_tokens.tolist()
        acc_list = n_acc.tolist()
        return [row[: a + 1] for row, a in zip(out_list, acc_list, strict=True)], acc_list

    def _accept_greedy(
        self,
        items: Sequence[VerifyItem],
        num_draft: Sequence[int],
        logits: torch.Tensor,  # [sum(k_b + 1), V]
    ) -> tuple[list[list[int]], list[int]]:
        """Every sequence greedy: the target's argmax tokens come to the host in one read and
        acceptance is a few integer comparisons per sequence (the same rule as
        ``rejection_sample_strict`` and ``synthetic_accept``, without a launch per step)."""
        target = logits.argmax(dim=-1).tolist()  # NOTE: the call's one device read
        cond = self.synthetic_cond
        uniforms: list[list[float]] = []
        if cond is not None:
            k_max = max(num_draft, default=0)
            gens = [self._synthetic_gens[it.delta.seq_id] for it in items]
            uniforms = draw_synthetic_uniforms(num_draft, k_max, gens).tolist()  # [B, K]
        outputs: list[list[int]] = []
        accepted: list[int] = []
        off = 0
        for b, it in enumerate(items):
            n, drafts = num_draft[b], it.draft_token_ids
            own = target[off : off + n + 1]  # the target's token at each position
            off += n + 1
            a = 0
            if cond is None:
                while a < n and drafts[a] == own[a]:
                    a += 1
            else:
                while a < n and a < len(cond) and uniforms[b][a] < cond[a]:
                    a += 1
            outputs.append(list(drafts[:a]) + [own[a]])
            accepted.append(a)
        return outputs, accepted

    def _accept_synthetic(
        self,
        items: Sequence[VerifyItem],
        params: Sequence[SamplingParams],
        greedy: list[int],
        random: list[int],
        drafts: torch.Tensor,  # [B, K]
        n_draft: torch.Tensor,  # [B]
        logits: torch.Tensor,  # [sum(k_b + 1), V]
        gather: torch.Tensor,  # [B, K+1]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Benchmarks only: accept at the set rates; the target's own token follows."""
        assert self.synthetic_cond is not None
        dev = logits.device
        k_max = drafts.shape[1]
        target = torch.empty(gather.shape, dtype=torch.int64, device=dev)  # [B, K+1]
        if greedy:
            g = torch.tensor(greedy, device=dev)
            target[g] = logits[gather[g]].argmax(dim=-1)
        if random:
            r = torch.tensor(random, device=dev)
            sel = [params[b] for b in random]
            gens = [self._generators.get(items[b].delta.seq_id) for b in random]
            st = SamplingTensors.from_lists(
                [p.temperature for p in sel],
                [p.top_k for p in sel],
                [p.top_p for p in sel],
                gens,
                dev,
            )
            probs = self.sampler.compute_probs(logits[gather[r]], st)  # [Br, K+1, V]
            noise = draw_exponential((k_max + 1, probs.shape[-1]), gens, dev, probs.dtype)
            target[r] = exponential_race(probs, noise)
        uniforms = draw_synthetic_uniforms(
            n_draft.tolist(), k_max, [self._synthetic_gens[it.delta.seq_id] for it in items]
        )  # [B, K]
        return synthetic_accept(drafts, n_draft, target, uniforms, self.synthetic_cond)

    def _accept_random(
        self,
        items: Sequence[VerifyItem],
        params: Sequence[SamplingParams],
        rows: list[int],
        drafts: torch.Tensor,  # [Br, K]
        n_draft: torch.Tensor,  # [Br]
        logits: torch.Tensor,  # [sum(k_b + 1), V]
        gather: torch.Tensor,  # [Br, K+1]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        dev = logits.device
        k_max = drafts.shape[1]
        sel = [params[b] for b in rows]
        gens = [self._generators.get(items[b].delta.seq_id) for b in rows]
        st = SamplingTensors.from_lists(
            [p.temperature for p in sel],
            [p.top_k for p in sel],
            [p.top_p for p in sel],
            gens,
            dev,
        )
        probs = self.sampler.compute_probs(logits[gather], st)  # [Br, K+1, V]
        vocab = probs.shape[-1]
        if self.verification == "strict" or k_max == 0:
            # NOTE: sample-then-compare: every emitted token is a sample of p, hence lossless.
            noise = draw_exponential((k_max + 1, vocab), gens, dev, probs.dtype)  # [Br, K+1, V]
            target = exponential_race(probs, noise)  # [Br, K+1]
            return self.sampler.rejection_sample_strict(drafts, n_draft, target)
        q = torch.zeros(len(rows), k_max, vocab, dtype=probs.dtype, device=dev)
        for i, b in enumerate(rows):
            it = items[b]
            n = len(it.draft_token_ids)
            if n == 0:
                continue
            if it.draft_probs is not None:
                q[i, :n] = it.draft_probs[:n].to(device=dev, dtype=probs.dtype)
            else:
                q[i, torch.arange(n), torch.tensor(it.draft_token_ids)] = 1.0
        uniforms, noise = draw_rejection_randoms(
            n_draft.tolist(), k_max, vocab, gens, dev, probs.dtype
        )  # [Br, K], [Br, V]
        idx = torch.arange(len(rows), device=dev)
        # NOTE: one noise row per request: it draws the bonus only when nothing was rejected.
        bonus = exponential_race(probs[idx, n_draft], noise)  # [Br]
        return self.sampler.rejection_sample(drafts, n_draft, q, probs, uniforms, noise, bonus)
