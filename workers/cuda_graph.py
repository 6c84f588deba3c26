"""CUDA graphs for the decode and verify steps: static inputs, padding, capture and replay.

A step fits a graph when every sequence has the same number of query tokens ``q`` (1 for a
decode step, k + 1 for a verify step), ``q <= max_query_len``, and the ``n`` sequences fit one
of the captured batch sizes; ``n`` is padded up to the smallest size ``B >= n``. Everything else
(prefills, mixed query lengths, larger batches) runs eagerly.

The model reads its inputs from static buffers sized for the largest step: ``input_ids``,
``positions`` and ``slot_mapping`` of ``B * q`` tokens, ``query_start_loc``, ``seq_lens`` and
``block_tables`` padded to the blocks of ``max_model_len``. The attention metadata of a graph
holds the host values fixed at capture: ``max_query_len = q`` and ``max_seq_len =
max_model_len`` (a backend that declares ``cuda_graph_safe`` is correct for any shorter
sequence). A replay copies the step's tensors into the buffers (device to device, no host
sync), fills the padding rows and replays; the caller gets the first ``n * q`` rows.

Padding rows are sequences of ``q`` new tokens at positions ``0..q-1`` whose K/V go to the
runner's scratch block (a physical block the KV manager never hands out), so they touch no real
sequence; their outputs are dropped.

Without capture (``capture=False``, the CPU mode) the same copy → forward on the static buffers
→ slice path runs eagerly, so the padding logic is testable without a GPU.

Query lengths above 1 get graphs once two consecutive steps use them (steady verify rounds), so
a one-off continuation (a new chat turn on a cached sequence, the clipped last round of a
request) never triggers a capture; ``capture()`` captures chosen lengths ahead of time.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import nn

from outrider.kernels.attention.metadata import AttentionMetadata
from outrider.workers.forward_context import ForwardContext, forward_context
from outrider.workers.layers.moe import FusedMoE
from outrider.workers.models.base import ModelOutput

if TYPE_CHECKING:
    from outrider.workers.runner import ModelRunner, PreparedBatch

logger = logging.getLogger(__name__)

_WARMUP_RUNS = 2
_T = TypeVar("_T")


_CAPTURE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def capture_stream(device: torch.device) -> torch.cuda.Stream:
    """The side stream graphs on ``device`` are captured on.

    NOTE: without one, ``torch.cuda.graph`` captures on a stream it creates once per process on
    whatever device is current then; with the target on cuda:0 and the drafter on cuda:1 in one
    process, whichever captured first would pin every later capture to its own GPU.
    """
    stream = _CAPTURE_STREAMS.get(device)
    if stream is None:
        stream = _CAPTURE_STREAMS[device] = torch.cuda.Stream(device)
    return stream


def capture_graph(
    fn: Callable[[], _T], device: torch.device, pool: Any = None
) -> tuple[torch.cuda.CUDAGraph, _T]:
    """``fn`` warmed up on a side stream, then captured on ``device``'s capture stream into
    ``pool`` (None: a new pool); returns the graph and what the captured call returned (its
    static outputs). Raises RuntimeError when the capture fails."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(_WARMUP_RUNS):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(
        graph, pool=pool, stream=capture_stream(device), capture_error_mode="thread_local"
    ):
        out = fn()
    return graph, out


def capture_down(
    size: int,
    batch_sizes: Sequence[int],
    variants: Iterable[int],
    missing: Callable[[int, int], bool],
    capture: Callable[[int, int], object | None],
) -> bool:
    """Capture every missing (batch size, variant) at ``size`` and every smaller batch size,
    largest first (the smaller graphs reuse its memory pool): a batch size's first capture
    takes them all, so none is captured in the middle of a request when its shape changes or
    its batch shrinks. False when a capture fails (``capture`` returned None)."""
    ordered = sorted(set(variants), reverse=True)
    for b in sorted(batch_sizes, reverse=True):
        if b > size:
            continue
        for v in ordered:
            if missing(b, v) and capture(b, v) is None:
                return False
    return True


def padded_batch_size(num_seqs: int, batch_sizes: Sequence[int]) -> int | None:
    """The smallest captured size that holds ``num_seqs`` sequences; None if none does."""
    fits = [b for b in batch_sizes if b >= num_seqs]
    return min(fits) if fits and num_seqs > 0 else None


def graph_blockers(model: nn.Module, attn_backend: Any) -> list[str]:
    """Why this model cannot be captured with these backends (empty: it can)."""
    reasons = []
    if not getattr(attn_backend, "cuda_graph_safe", False):
        name = getattr(attn_backend, "name", type(attn_backend).__name__)
        reasons.append(f"attention backend {name!r} is not CUDA-graph safe")
    moe = {m.moe_backend: m.kernel for m in model.modules() if isinstance(m, FusedMoE)}
    for name, kernel in sorted(moe.items()):
        if not getattr(kernel, "cuda_graph_safe", False):
            reasons.append(f"moe backend {name!r} is not CUDA-graph safe")
    return reasons


@dataclass
class _Static:
    input_ids: torch.Tensor  # [B_max * q_max] int64
    positions: torch.Tensor  # [B_max * q_max] int64
    slot_mapping: torch.Tensor  # [B_max * q_max] int64
    query_start_loc: torch.Tensor  # [B_max + 1] int64
    seq_lens: torch.Tensor  # [B_max] int64
    block_tables: torch.Tensor  # [B_max, max_blocks] int64


@dataclass
class _Padding:
    """Per query length: what padding rows hold, laid out like the static buffers."""

    positions: torch.Tensor  # [B_max * q] 0..q-1 per row
    slot_mapping: torch.Tensor  # [B_max * q] scratch-block slots
    query_start_loc: torch.Tensor  # [B_max + 1] = arange * q
    num_blocks: int  # block-table columns a padding row uses


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    output: ModelOutput  # static: written by every replay
    # NOTE: holds the backends' per-forward scratch (allocated in the graph's pool).
    metadata: AttentionMetadata


class GraphRunner:
    """Replays (or, with ``capture=False``, runs eagerly) a runner's decode/verify steps on
    static buffers; one graph per (padded batch size, query length, aux layer ids)."""

    def __init__(
        self,
        runner: ModelRunner,
        *,
        batch_sizes: Sequence[int],
        max_query_len: int,
        capture: bool = True,
    ) -> None:
        if capture and runner.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got {runner.device}")
        self.runner = runner
        self.batch_sizes = sorted(set(batch_sizes))
        self.max_query_len = max_query_len
        self.capture_graphs = capture
        self.max_batch_size = self.batch_sizes[-1]
        self.max_seq_len = runner.max_model_len
        self.scratch_block = runner.scratch_block
        self.num_replays = 0
        self.disabled_reason: str | None = None
        dev = runner.device
        tokens = self.max_batch_size * max_query_len
        width = -(-self.max_seq_len // runner.block_size)

        def zeros(*shape: int) -> torch.Tensor:
            return torch.zeros(shape, dtype=torch.int64, device=dev)

        self._static = _Static(
            zeros(tokens),
            zeros(tokens),
            zeros(tokens),
            zeros(self.max_batch_size + 1),
            zeros(self.max_batch_size),
            zeros(self.max_batch_size, width),
        )
        self._padding: dict[int, _Padding] = {}
        self._graphs: dict[tuple[int, int, tuple[int, ...]], _Graph] = {}
        self._pool: Any = None
        self._ready_query_lens: set[int] = {1}
        # NOTE: captured together at a batch size's first capture (verify rounds whose k
        # changes from round to round, e.g. under the goodput policy, never capture mid-run).
        self._expected_query_lens: set[int] = set()
        self._last_query_len: int | None = None

    # -- which steps fit ---------------------------------------------------------------------
    def fit(self, batch: PreparedBatch) -> tuple[int, int] | None:
        """``(padded batch size, query length)`` when this step replays a graph, else None."""
        md = batch.attn_metadata
        q_lens = md.query_lens_cpu
        last, self._last_query_len = self._last_query_len, (q_lens[0] if q_lens else None)
        if self.disabled_reason is not None or not md.causal or not q_lens:
            return None
        q = q_lens[0]
        if q > self.max_query_len or any(x != q for x in q_lens):
            return None
        size = padded_batch_size(len(q_lens), self.batch_sizes)
        if size is None or md.max_seq_len > self.max_seq_len:
            return None
        if q > 1:
            # NOTE: only continuations (every sequence has cached tokens before this step).
            if any(s <= q for s in md.seq_lens_cpu):
                return None
            if q not in self._ready_query_lens and q != last:
                return None
            self._ready_query_lens.add(q)
        return size, q

    # -- replay ------------------------------------------------------------------------------
    def run(self, batch: PreparedBatch, aux_layer_ids: tuple[int, ...] = ()) -> ModelOutput | None:
        """The step's output through the static buffers, or None: run it eagerly."""
        fitted = self.fit(batch)
        if fitted is None:
            return None
        size, q = fitted
        aux = tuple(sorted(set(aux_layer_ids)))
        if self.capture_graphs:
            entry = self._graphs.get((size, q, aux)) or self._capture_with_expected(size, q, aux)
            if entry is None:
                return None
            self._stage(batch, size, q)
            entry.graph.replay()
            out = entry.output
        else:
            self._stage(batch, size, q)
            out, _ = self._forward_static(size, q, aux)
        self.num_replays += 1
        return _head(out, batch.attn_metadata.num_seqs * q)

    def expect_query_lens(self, query_lens: Iterable[int]) -> None:
        """Query lengths verify rounds will use (1 + k for every k from 0 up to the longest):
        each is ready at once, and a batch size's first capture captures them all, at that size
        and every smaller one (a batch shrinks as its requests finish)."""
        for q in query_lens:
            if 1 <= q <= self.max_query_len and q not in self._expected_query_lens:
                self._expected_query_lens.add(q)
                self._ready_query_lens.add(q)

    @torch.inference_mode()
    def capture(self, query_lens: Sequence[int], aux_layer_ids: Sequence[int] = ()) -> int:
        """Capture every batch size for these query lengths now; returns how many were new."""
        aux = tuple(sorted(set(aux_layer_ids)))
        count = 0
        for q in query_lens:
            if not 1 <= q <= self.max_query_len:
                raise ValueError(f"query length {q} is outside [1, {self.max_query_len}]")
            self._ready_query_lens.add(q)
            if not self.capture_graphs:
                continue
            # NOTE: largest first, so smaller graphs reuse the pool memory of larger ones.
            for size in reversed(self.batch_sizes):
                if (size, q, aux) in self._graphs:
                    continue
                if self._capture(size, q, aux) is None:
                    return count
                count += 1
        return count

    @property
    def num_graphs(self) -> int:
        return len(self._graphs)

    # -- internals ---------------------------------------------------------------------------
    def _pad(self, q: int) -> _Padding:
        pad = self._padding.get(q)
        if pad is None:
            dev, bs = self.runner.device, self.runner.block_size
            j = torch.arange(q, dtype=torch.int64, device=dev).repeat(self.max_batch_size)
            pad = _Padding(
                positions=j,
                slot_mapping=self.scratch_block * bs + j % bs,
                query_start_loc=torch.arange(self.max_batch_size + 1, dtype=torch.int64, device=dev)
                * q,
                num_blocks=-(-q // bs),
            )
            self._padding[q] = pad
        return pad

    def _stage(self, batch: PreparedBatch | None, size: int, q: int) -> None:
        """Copy the step into the static buffers and fill rows ``n..size-1`` with padding."""
        s, pad = self._static, self._pad(q)
        n = 0 if batch is None else batch.attn_metadata.num_seqs
        nq, bq = n * q, size * q
        if batch is not None:
            md = batch.attn_metadata
            s.input_ids[:nq].copy_(batch.input_ids)
            s.positions[:nq].copy_(batch.positions)
            s.slot_mapping[:nq].copy_(md.slot_mapping)
            s.seq_lens[:n].copy_(md.seq_lens)
            # NOTE: columns past a row's last block keep stale block ids; no key reaches them.
            s.block_tables[:n, : md.block_tables.shape[1]].copy_(md.block_tables)
        if size > n:
            s.input_ids[nq:bq].zero_()
            s.positions[nq:bq].copy_(pad.positions[nq:bq])
            s.slot_mapping[nq:bq].copy_(pad.slot_mapping[nq:bq])
            s.seq_lens[n:size].fill_(q)
            s.block_tables[n:size, : pad.num_blocks].fill_(self.scratch_block)
        s.query_start_loc[: size + 1].copy_(pad.query_start_loc[: size + 1])

    def _forward_static(
        self, size: int, q: int, aux: tuple[int, ...]
    ) -> tuple[ModelOutput, AttentionMetadata]:
        s, runner = self._static, self.runner
        bq = size * q
        # NOTE: fresh views and metadata on every call: per-forward memos keyed by tensor
        # identity (rotary cos/sin) and backend plans must be rebuilt, never reused across
        # captures.
        md = AttentionMetadata(
            slot_mapping=s.slot_mapping[:bq],
            query_start_loc=s.query_start_loc[: size + 1],
            seq_lens=s.seq_lens[:size],
            block_tables=s.block_tables[:size],
            max_query_len=q,
            max_seq_len=self.max_seq_len,
            causal=True,
            query_lens_cpu=[q] * size,
        )
        ctx = ForwardContext(md, runner.kv_caches, runner.attn_backend)
        with forward_context(ctx):
            out = runner.model(s.input_ids[:bq], s.positions[:bq], aux_layer_ids=aux)
        return out, md

    def _capture_with_expected(self, size: int, q: int, aux: tuple[int, ...]) -> _Graph | None:
        """The graph of (size, q), captured with the other expected query lengths of ``size``
        and, when lengths are expected, with those of every smaller size; None when a capture
        fails."""
        graph = self._capture(size, q, aux)  # NOTE: largest first: the rest reuse its pool
        if graph is None or not self._expected_query_lens:
            return graph
        done = capture_down(
            size,
            self.batch_sizes,
            self._expected_query_lens | {q},
            lambda b, n: (b, n, aux) not in self._graphs,
            lambda b, n: self._capture(b, n, aux),
        )
        return graph if done else None

    def _capture(self, size: int, q: int, aux: tuple[int, ...]) -> _Graph | None:
        dev = self.runner.device
        try:
            self._stage(None, size, q)
            graph, (out, md) = capture_graph(
                lambda: self._forward_static(size, q, aux), dev, self._pool
            )
        except RuntimeError as e:
            self.disabled_reason = f"capture of batch {size} x {q} tokens failed: {e}"
            logger.warning("CUDA graphs off for this runner: %s", self.disabled_reason)
            return None
        if self._pool is None:
            self._pool = graph.pool()
        entry = _Graph(graph, out, md)
        self._graphs[(size, q, aux)] = entry
        logger.debug("captured a CUDA graph for batch %d x %d tokens", size, q)
        return entry


def _head(out: ModelOutput, rows: int) -> ModelOutput:
    """The first ``rows`` rows of every output (views, valid until the next step)."""
    hidden = None if out.hidden_states is None else out.hidden_states[:rows]
    aux = {i: a[:rows] for i, a in out.aux_hidden_states.items()}
    return ModelOutput(hidden, None, aux)
