"""EAGLE-3's sequential draft steps 2..k as one CUDA graph per (padded batch size, steps).

Eagerly, each draft step is a host round trip: build the step's metadata, launch a decoder layer
and the head one kernel at a time, read the token back. On a GPU that is host-bound (tens of
Triton and torch launches per step, each costing more host time than its kernel takes). Here
the steps run on the device back to back: step ``j`` embeds the token step ``j - 1`` picked
(argmax, on the device), feeds back its hidden state, writes its K/V and reads the cache through
its own metadata row; the host reads all drafts once at the end.

The host knows every step's geometry up front: for a sequence whose context ends at ``e``,
step ``j`` (1-based) sits at position ``e + j - 1`` and leaves ``e + j`` cached tokens, and its
cache slot comes from the KV manager before the replay (the same slots the eager steps would
append, in the same order). Rows past the live sequences are padding: they write and read the
runner's scratch block only. Greedy drafts only (sampled drafts keep the eager loop, which also
returns their q rows).

With ``capture=False`` (CPU) the same static-buffer path runs eagerly, so the staging and the
padding are testable without a GPU.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from outrider.kernels.attention.metadata import AttentionMetadata
from outrider.workers.cuda_graph import capture_down, capture_graph, padded_batch_size
from outrider.workers.forward_context import ForwardContext, forward_context
from outrider.workers.staging import to_device_ints

if TYPE_CHECKING:
    from outrider.workers.models.eagle3 import Eagle3DraftModel
    from outrider.workers.runner import ModelRunner

logger = logging.getLogger(__name__)


class DraftStepGraphs:
    """Replays (or, with ``capture=False``, runs on static buffers) the sequential draft steps
    of an EAGLE-3 drafter for batches of up to ``max(batch_sizes)`` sequences."""

    def __init__(
        self,
        runner: ModelRunner,
        model: Eagle3DraftModel,
        *,
        batch_sizes: Sequence[int],
        max_steps: int,
        capture: bool = True,
        usual_steps: int = 0,
    ) -> None:
        """``usual_steps``: the configured k - 1; the first call at a batch size captures every
        step count up to it at that size and the smaller ones, so a round clipped near the end
        of a request, or of fewer sequences, finds its graph."""
        if capture and runner.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got {runner.device}")
        self.runner = runner
        self.model = model
        self.batch_sizes = sorted(set(batch_sizes))
        self.max_batch_size = self.batch_sizes[-1]
        self.max_steps = max_steps
        self.capture_graphs = capture
        self.usual_steps = min(usual_steps, max_steps)
        self.disabled_reason: str | None = None
        self.num_replays = 0
        dev, b, s = runner.device, self.max_batch_size, max_steps
        width = -(-runner.max_model_len // runner.block_size)
        hidden = int(model.config.hidden_size)

        def ints(*shape: int) -> torch.Tensor:
            return torch.zeros(shape, dtype=torch.int64, device=dev)

        self._token = ints(b)  # [B] the token of step 1 (picked from the context forward)
        self._hidden = torch.zeros(b, hidden, dtype=runner.dtype, device=dev)  # [B, H]
        # [3, S, B] host-staged geometry: positions, slot_mapping, seq_lens per step
        self._geometry = ints(3, s, b)
        self._query_start_loc = torch.arange(b + 1, dtype=torch.int64, device=dev)
        self._block_tables = ints(b, width)
        self._drafts = ints(s, b)  # [S, B] output
        self._graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self._pool: object = None

    @property
    def num_graphs(self) -> int:
        return len(self._graphs)

    def fits(self, num_seqs: int, steps: int) -> int | None:
        """The padded batch size when ``num_seqs`` sequences x ``steps`` steps replay a graph."""
        if self.disabled_reason is not None or not 1 <= steps <= self.max_steps:
            return None
        return padded_batch_size(num_seqs, self.batch_sizes)

    # -- one call ----------------------------------------------------------------------------
    @torch.inference_mode()
    def run(
        self,
        seq_ids: Sequence[int],
        ends: Sequence[int],  # cached tokens of each sequence after its context forward
        tokens: torch.Tensor,  # [n] step-1 drafts (device)
        hidden: torch.Tensor,  # [n, H] the context forward's fed-back rows
        steps: int,
    ) -> list[list[int]] | None:
        """Drafts 1..steps+1 of every sequence ([n][steps + 1], ``tokens`` first), or None: run
        the eager loop instead."""
        n = len(seq_ids)
        size = self.fits(n, steps)
        if size is None or any(e + steps > self.runner.max_model_len for e in ends):
            return None
        key = (size, steps)
        if self.capture_graphs and key not in self._graphs:
            # NOTE: with every usual step count, at this size and the smaller ones.
            if not capture_down(
                size,
                self.batch_sizes,
                {steps, *range(1, self.usual_steps + 1)},
                lambda b, s: (b, s) not in self._graphs,
                self._capture,
            ):
                return None
        self._stage(seq_ids, ends, tokens, hidden, size, steps)
        graph = self._graphs.get(key)
        if graph is not None:
            graph.replay()
        else:
            self._steps(size, steps)
        self.num_replays += 1
        drafts = torch.cat((tokens.view(1, n), self._drafts[:steps, :n]))  # [steps + 1, n]
        return drafts.T.tolist()  # type: ignore[no-any-return]  # NOTE: the call's one sync

    # -- internals ---------------------------------------------------------------------------
    def _stage(
        self,
        seq_ids: Sequence[int] | None,
        ends: Sequence[int],
        tokens: torch.Tensor | None,
        hidden: torch.Tensor | None,
        size: int,
        steps: int,
    ) -> None:
        """Take the steps' cache slots and copy every input into the static buffers."""
        runner, kv, bs = self.runner, self.runner.kv, self.runner.block_size
        scratch = runner.scratch_block
        n = 0 if seq_ids is None else len(seq_ids)
        # NOTE: padding rows write slot 0 of the scratch block and read that one key.
        pos = [[0] * size for _ in range(steps)]
        slot = [[scratch * bs] * size for _ in range(steps)]
        lens = [[1] * size for _ in range(steps)]
        tables: list[list[int]] = []
        for b in range(n):
            assert seq_ids is not None
            seq_id, end = seq_ids[b], ends[b]
            kv.truncate(seq_id, end)
            slots = kv.append(seq_id, steps)
            for j in range(steps):
                pos[j][b], slot[j][b], lens[j][b] = end + j, slots[j], end + j + 1
            tables.append(kv.block_table(seq_id))
        width = max((len(t) for t in tables), default=0)
        geometry, flat_tables = to_device_ints(
            [
                [x for rows in (pos, slot, lens) for row in rows for x in row],
                [i for t in tables for i in t + [0] * (width - len(t))],
            ],
            runner.device,
        )
        self._geometry[:, :steps, :size].copy_(geometry.view(3, steps, size))
        if n:
            # NOTE: columns past a row's last block keep stale ids; no key reaches them.
            self._block_tables[:n, :width].copy_(flat_tables.view(n, width))
        self._block_tables[n:size, :1].fill_(scratch)
        if tokens is not None and hidden is not None:
            self._token[:n].copy_(tokens)
            self._hidden[:n].copy_(hidden)
        self._token[n:size].zero_()
        self._hidden[n:size].zero_()

    def _steps(self, size: int, steps: int) -> None:
        """Every draft step on the static buffers: the graph's body."""
        runner, model = self.runner, self.model
        tok = self._token[:size]
        hid = self._hidden[:size]
        for j in range(steps):
            md = AttentionMetadata(
                slot_mapping=self._geometry[1, j, :size],
                query_start_loc=self._query_start_loc[: size + 1],
                seq_lens=self._geometry[2, j, :size],
                block_tables=self._block_tables[:size],
                max_query_len=1,
                max_seq_len=runner.max_model_len,
                causal=True,
                query_lens_cpu=[1] * size,
            )
            with forward_context(ForwardContext(md, runner.kv_caches, runner.attn_backend)):
                z, hid = model(tok, self._geometry[0, j, :size], hid)  # [B, H] x2
            tok = model.compute_logits(z).argmax(dim=-1)  # [B]
            self._drafts[j, :size].copy_(tok)

    def _capture(self, size: int, steps: int) -> torch.cuda.CUDAGraph | None:
        try:
            self._stage(None, [], None, None, size, steps)
            graph, _ = capture_graph(
                lambda: self._steps(size, steps), self.runner.device, self._pool
            )
        except RuntimeError as e:
            self.disabled_reason = f"capture of {size} sequences x {steps} steps failed: {e}"
            logger.warning("draft-step CUDA graphs off: %s", self.disabled_reason)
            return None
        if self._pool is None:
            self._pool = graph.pool()
        self._graphs[(size, steps)] = graph
        logger.debug("captured the draft steps for %d sequences x %d steps", size, steps)
        return graph
