"""EAGLE-3's context forward (the first forward of a drafter call) as one CUDA graph per
(padded batch size, query length).

Eagerly, the context forward of a one-layer head is bound by the host: building the step's
metadata and launching its kernels one at a time costs more than the kernels run. In steady
drafting each sequence brings only what the last round confirmed (1..k+1 tokens; a P-EAGLE call
adds k - 1 mask slots), so the forward fits a few fixed shapes: every sequence's query is padded
to one length L, the batch to a captured size, and the graph reads its inputs from static
buffers the host fills with one asynchronous copy.

Padding positions of a live sequence sit past its real tokens: causal attention keeps them out
of every real query. They write K/V of their own into slots past the real tokens (so no key a
query loads is stale), which the KV manager takes back after staging. Padding sequences write
and read the runner's scratch block only. Outputs, all on the device: the argmax token of each
requested row (``[B * R]``, R rows per sequence: 1 for EAGLE-3, k for P-EAGLE), and the fed-back
hidden state of each sequence's last real row (``[B, H]``, for the draft-step graphs). Greedy
drafts only.

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
from outrider.workers.protocol import Delta
from outrider.workers.staging import to_device_ints

if TYPE_CHECKING:
    from outrider.workers.models.eagle3 import Eagle3DraftModel
    from outrider.workers.runner import ModelRunner

logger = logging.getLogger(__name__)


class DraftContextGraphs:
    """Replays (or, with ``capture=False``, runs on static buffers) the context forward of an
    EAGLE-3 drafter for batches of up to ``max(batch_sizes)`` sequences of up to
    ``max_query_len`` tokens each, with ``rows`` output rows per sequence."""

    def __init__(
        self,
        runner: ModelRunner,
        model: Eagle3DraftModel,
        *,
        batch_sizes: Sequence[int],
        max_query_len: int,
        rows: int,
        capture: bool = True,
    ) -> None:
        if capture and runner.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got {runner.device}")
        self.runner = runner
        self.model = model
        self.batch_sizes = sorted(set(batch_sizes))
        self.max_batch_size = b = self.batch_sizes[-1]
        self.max_query_len = q = max_query_len
        self.rows = rows
        self.capture_graphs = capture
        self.disabled_reason: str | None = None
        self.num_replays = 0
        dev = runner.device
        width = -(-runner.max_model_len // runner.block_size)
        hidden = int(model.config.hidden_size)

        def ints(*shape: int) -> torch.Tensor:
            return torch.zeros(shape, dtype=torch.int64, device=dev)

        self._ids = ints(b * q)
        self._positions = ints(b * q)
        self._slots = ints(b * q)
        self._seq_lens = ints(b)
        self._block_tables = ints(b, width)
        self._row_index = ints(b * rows)  # [B * R] rows whose logits are picked
        self._last_index = ints(b)  # [B] each sequence's last real row
        self._hidden = torch.zeros(b * q, hidden, dtype=runner.dtype, device=dev)  # [B * L, H]
        self._tokens = ints(b * rows)  # [B * R] output
        self._fed = torch.zeros(b, hidden, dtype=runner.dtype, device=dev)  # [B, H] output
        self._query_start = {
            n: torch.arange(b + 1, dtype=torch.int64, device=dev) * n for n in range(1, q + 1)
        }
        self._graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self._pool: object = None

    @property
    def num_graphs(self) -> int:
        return len(self._graphs)

    def fits(self, deltas: Sequence[Delta]) -> tuple[int, int] | None:
        """``(padded batch size, query length)`` when these contexts replay a graph."""
        if self.disabled_reason is not None or not deltas:
            return None
        q = max(len(d.token_ids) for d in deltas)
        if not 1 <= q <= self.max_query_len:
            return None
        if any(d.start_pos + q > self.runner.max_model_len for d in deltas):
            return None
        size = padded_batch_size(len(deltas), self.batch_sizes)
        return None if size is None else (size, q)

    # -- one call ----------------------------------------------------------------------------
    @torch.inference_mode()
    def run(
        self,
        deltas: Sequence[Delta],  # each sequence's context (its tokens and where they start)
        hidden: torch.Tensor,  # [sum of lengths, H] the fed rows, packed in delta order
        rows: Sequence[Sequence[int]],  # per sequence, 1..R rows within its delta
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(tokens [n * R], fed [n, H])`` as device views (valid until the next call; a
        sequence with fewer rows repeats its last), or None: run the forward eagerly."""
        fitted = self.fits(deltas)
        if fitted is None or any(not 1 <= len(r) <= self.rows for r in rows):
            return None
        size, q = fitted
        if self.capture_graphs and (size, q) not in self._graphs:
            # NOTE: every query length, at this size and the smaller ones.
            if not capture_down(
                size,
                self.batch_sizes,
                range(1, self.max_query_len + 1),
                lambda b, n: (b, n) not in self._graphs,
                self._capture,
            ):
                return None
        self._stage(deltas, hidden, rows, size, q)
        graph = self._graphs.get((size, q))
        if graph is not None:
            graph.replay()
        else:
            self._forward(size, q)
        self.num_replays += 1
        n = len(deltas)
        return self._tokens[: n * self.rows], self._fed[:n]

    # -- internals ---------------------------------------------------------------------------
    def _stage(
        self,
        deltas: Sequence[Delta],
        hidden: torch.Tensor | None,
        rows: Sequence[Sequence[int]],
        size: int,
        q: int,
    ) -> None:
        """Take the contexts' cache slots and copy every input into the static buffers."""
        runner, kv, bs = self.runner, self.runner.kv, self.runner.block_size
        scratch = runner.scratch_block
        n, total, r = len(deltas), size * q, self.rows
        # NOTE: padding sequences write slot j of the scratch block and read those keys.
        ids = [0] * total
        pos = [j for _ in range(size) for j in range(q)]
        slots = [scratch * bs + j % bs for _ in range(size) for j in range(q)]
        lens = [q] * size
        row_index = [0] * (size * r)
        last = [0] * size
        src_zero = 0 if hidden is None else int(hidden.shape[0])
        gather = [src_zero] * total  # row of ``src`` each static hidden row takes (padding: 0s)
        tables: list[list[int]] = []
        offset = 0
        for b, d in enumerate(deltas):
            m = len(d.token_ids)
            kv.truncate(d.seq_id, d.start_pos)
            # NOTE: padding positions write K/V of their own (token 0, zero hidden) into slots
            # past the real tokens, so every key below seq_lens is one this forward wrote;
            # they are given back below, once every sequence holds its slots.
            got = kv.append(d.seq_id, q)
            for j in range(q):
                t = b * q + j
                pos[t], slots[t] = d.start_pos + j, got[j]
                if j < m:
                    ids[t], gather[t] = d.token_ids[j], offset + j
            lens[b] = d.start_pos + q
            picked = rows[b]
            for i in range(r):
                # NOTE: fewer rows than the graph picks: the last one again (ignored).
                row_index[b * r + i] = b * q + picked[min(i, len(picked) - 1)]
            last[b] = b * q + m - 1
            tables.append(kv.block_table(d.seq_id))
            offset += m
        for d in deltas:
            kv.truncate(d.seq_id, d.start_pos + len(d.token_ids))
        width = max((len(t) for t in tables), default=0)
        staged = to_device_ints(
            [
                ids,
                pos,
                slots,
                lens,
                row_index,
                last,
                gather,
                [i for t in tables for i in t + [0] * (width - len(t))],
            ],
            runner.device,
        )
        ids_d, pos_d, slots_d, lens_d, rows_d, last_d, gather_d, tables_d = staged
        self._ids[:total].copy_(ids_d)
        self._positions[:total].copy_(pos_d)
        self._slots[:total].copy_(slots_d)
        self._seq_lens[:size].copy_(lens_d)
        self._row_index[: size * r].copy_(rows_d)
        self._last_index[:size].copy_(last_d)
        if n:
            # NOTE: columns past a row's last block keep stale ids; no real key reaches them.
            self._block_tables[:n, :width].copy_(tables_d.view(n, width))
        self._block_tables[n:size, : -(-q // bs)].fill_(scratch)
        h = self._hidden.shape[1]
        zero = torch.zeros(1, h, dtype=self._hidden.dtype, device=self._hidden.device)
        src = zero if hidden is None else torch.cat((hidden.to(self._hidden.dtype), zero))
        torch.index_select(src, 0, gather_d, out=self._hidden[:total])

    def _forward(self, size: int, q: int) -> None:
        """The context forward on the static buffers: the graph's body."""
        runner, model, total = self.runner, self.model, size * q
        md = AttentionMetadata(
            slot_mapping=self._slots[:total],
            query_start_loc=self._query_start[q][: size + 1],
            seq_lens=self._seq_lens[:size],
            block_tables=self._block_tables[:size],
            max_query_len=q,
            max_seq_len=runner.max_model_len,
            causal=True,
            query_lens_cpu=[q] * size,
        )
        with forward_context(ForwardContext(md, runner.kv_caches, runner.attn_backend)):
            z, fed = model(self._ids[:total], self._positions[:total], self._hidden[:total])
        picked = z.index_select(0, self._row_index[: size * self.rows])  # [B * R, H]
        self._tokens[: size * self.rows].copy_(model.compute_logits(picked).argmax(dim=-1))
        self._fed[:size].copy_(fed.index_select(0, self._last_index[:size]))

    def _capture(self, size: int, q: int) -> torch.cuda.CUDAGraph | None:
        try:
            self._stage([], None, [], size, q)
            graph, _ = capture_graph(lambda: self._forward(size, q), self.runner.device, self._pool)
        except RuntimeError as e:
            self.disabled_reason = f"capture of {size} sequences x {q} tokens failed: {e}"
            logger.warning("draft context CUDA graphs off: %s", self.disabled_reason)
            return None
        if self._pool is None:
            self._pool = graph.pool()
        self._graphs[(size, q)] = graph
        return graph
