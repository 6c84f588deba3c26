"""ModelRunner: turns deltas into one packed forward over the paged cache.

It owns the model of one worker (one pipeline stage of it), the KV cache and the resolved
kernel backends. Sampling and verification live in ``verifier.py``; drafting in ``proposers/``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn

from outrider.kernels import registry
from outrider.kernels.attention.metadata import AttentionMetadata
from outrider.workers.config import ConfigError, WorkerConfig
from outrider.workers.cuda_graph import GraphRunner, graph_blockers
from outrider.workers.distributed import get_pp_group, get_tp_group
from outrider.workers.forward_context import ForwardContext, forward_context
from outrider.workers.kv_cache import KVCacheManager, allocate_kv_caches, kv_bytes_per_block
from outrider.workers.models.base import IntermediateTensors, ModelOutput
from outrider.workers.models.loader import load_model
from outrider.workers.pipeline import broadcast_from_last, recv_stage_input, send_stage_output
from outrider.workers.protocol import Delta
from outrider.workers.staging import to_device_ints

logger = logging.getLogger(__name__)

ModelBuilder = Callable[[torch.device, torch.dtype, str], tuple[nn.Module, Any]]

_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}
# NOTE: the default cache holds this many sequences of full max_model_len (capped by memory).
_DEFAULT_FULL_SEQS = 16
_DEFAULT_CACHE_GIB = 1.0


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"`device` {name!r} is not available here; choices: auto, cpu")
    return dev


def on_device(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """Make ``device`` the current CUDA device inside the block.

    NOTE: Triton launches on the *current* device's stream, whatever device its tensors are on;
    with the target on cuda:0 and the drafter on cuda:1 in one process, the drafter's kernels
    would otherwise run on GPU 0 over peer memory, unordered with its own torch ops.
    """
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


_F = TypeVar("_F", bound=Callable[..., Any])


def on_runner_device(fn: _F) -> _F:
    """A method of an object with a ``runner`` runs with that runner's device current."""

    @functools.wraps(fn)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        with on_device(self.runner.device):
            return fn(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        # NOTE: CPUs run float32 fastest; GPUs bfloat16.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


@dataclass
class PreparedBatch:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    attn_metadata: AttentionMetadata
    query_start_loc: list[int]  # [B + 1] host copy
    seq_ids: list[int]

    @property
    def last_token_indices(self) -> list[int]:
        return [end - 1 for end in self.query_start_loc[1:]]


class ModelRunner:
    def __init__(
        self,
        cfg: WorkerConfig,
        *,
        start_layer: int = 0,
        end_layer: int | None = None,
        group: str = "target",
        build: ModelBuilder | None = None,
    ) -> None:
        """``build(device, dtype, moe_backend) -> (model, hf_config)`` replaces the loader for
        models that are not plain causal LMs (EAGLE-3 and DFlash drafters)."""
        cfg.kernels.validate(f"{group}.kernels")
        self.cfg = cfg
        self.group = group
        self.device = resolve_device(cfg.device)
        self.dtype = resolve_dtype(cfg.model.dtype, self.device)
        quant = cfg.model.quantization
        self.attention_backend = registry.resolve(
            "attention",
            cfg.kernels.attention_backend,
            self.device,
            self.dtype,
            "none",
            setting=f"{group}.attention_backend",
        )
        self.moe_backend = registry.resolve(
            "moe",
            cfg.kernels.moe_backend,
            self.device,
            self.dtype,
            quant,
            setting=f"{group}.moe_backend",
        )
        self.attn_backend = registry.get("attention", self.attention_backend)
        self.model: nn.Module
        # NOTE: loading may run kernels (a P-EAGLE head fuses its mask hidden state).
        with on_device(self.device):
            if build is not None:
                self.model, self.hf_config = build(self.device, self.dtype, self.moe_backend)
            else:
                self.model, self.hf_config = load_model(
                    cfg.model,
                    device=self.device,
                    dtype=self.dtype,
                    moe_backend=self.moe_backend,
                    start_layer=start_layer,
                    end_layer=end_layer,
                )
        self.model.eval()
        self.start_layer = start_layer
        self.end_layer = end_layer if end_layer is not None else self.hf_config.num_hidden_layers
        self.num_layers = self.end_layer - self.start_layer
        self.max_model_len = self._max_model_len()
        self.block_size = cfg.cache.block_size
        self.num_blocks = self._num_blocks()
        hc = self.hf_config
        self.num_kv_heads = self._local_kv_heads()
        self.head_dim = getattr(hc, "head_dim", None) or hc.hidden_size // hc.num_attention_heads
        self.kv = KVCacheManager(self.num_blocks, self.block_size)
        # NOTE: one physical block past the manager's: padding rows of graph steps write there.
        self.scratch_block = self.num_blocks
        self.kv_caches = allocate_kv_caches(
            self.num_layers,
            self.num_blocks + 1,
            self.block_size,
            self.num_kv_heads,
            self.head_dim,
            self.dtype,
            self.device,
        )
        self.graph_runner: GraphRunner | None = self._graph_runner()
        self.warm_up_attention((True,))

    def warm_up_attention(self, causal: tuple[bool, ...]) -> int:
        """Compile the attention kernel variants a request would otherwise compile on first use
        (a stall of hundreds of ms in the middle of it): every tile tier, split or not, for
        these masks. CUDA only; returns the launches made."""
        if self.device.type != "cuda":
            return 0
        hc = self.hf_config
        group = hc.num_attention_heads // (
            getattr(hc, "num_key_value_heads", None) or hc.num_attention_heads
        )
        with on_device(self.device):
            return self.attn_backend.warm_up(
                self.num_kv_heads * group,
                self.num_kv_heads,
                self.head_dim,
                self.block_size,
                self.dtype,
                self.device,
                causal=causal,
            )

    def _graph_runner(self) -> GraphRunner | None:
        """CUDA graphs for the target's decode and verify steps, when they can run."""
        kernels = self.cfg.kernels
        if self.device.type != "cuda" or kernels.enforce_eager or self.group != "target":
            return None
        blockers = graph_blockers(self.model, self.attn_backend)
        if get_pp_group().size > 1 or get_tp_group().size > 1:
            blockers.append("tensor/pipeline parallel groups run eagerly")
        if blockers:
            logger.info("%s: CUDA graphs off: %s", self.group, "; ".join(blockers))
            return None
        return GraphRunner(
            self,
            batch_sizes=kernels.cuda_graph_batch_sizes,
            max_query_len=kernels.cuda_graph_max_query_len,
        )

    def capture_cuda_graphs(
        self, query_lens: Sequence[int], aux_layer_ids: Sequence[int] = ()
    ) -> int:
        """Capture the decode/verify graphs of these query lengths now (else on first use)."""
        if self.graph_runner is None:
            return 0
        with on_device(self.device):
            return self.graph_runner.capture(query_lens, aux_layer_ids)

    # -- sizing -----------------------------------------------------------------------------
    def _max_model_len(self) -> int:
        limit = int(getattr(self.hf_config, "max_position_embeddings", 0) or 0) or 2048
        want = self.cfg.model.max_model_len
        if want is None:
            return limit
        if want > limit:
            raise ConfigError(
                f"`{self.group}.model.max_model_len` must be <= {limit} "
                f"(the model's max_position_embeddings), got {want}"
            )
        return want

    def _local_kv_heads(self) -> int:
        hc = self.hf_config
        total = getattr(hc, "num_key_value_heads", None) or hc.num_attention_heads
        tp = get_tp_group().size
        return max(1, total // tp)

    def _num_blocks(self) -> int:
        cache = self.cfg.cache
        if cache.num_blocks is not None:
            return cache.num_blocks
        hc = self.hf_config
        kv_heads = getattr(hc, "num_key_value_heads", None) or hc.num_attention_heads
        head_dim = getattr(hc, "head_dim", None) or hc.hidden_size // hc.num_attention_heads
        per_block = kv_bytes_per_block(
            self.num_layers, cache.block_size, kv_heads, head_dim, self.dtype
        )
        budget = int((cache.memory_gib or _DEFAULT_CACHE_GIB) * 2**30) // per_block
        if cache.memory_gib is not None:
            return max(1, budget)
        full = _DEFAULT_FULL_SEQS * math.ceil(self.max_model_len / cache.block_size)
        return max(1, min(budget, full))

    # -- batch preparation ------------------------------------------------------------------
    def prepare(self, deltas: Sequence[Delta], *, causal: bool = True) -> PreparedBatch:
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        q_start = [0]
        seq_lens: list[int] = []
        for d in deltas:
            have = self.kv.num_tokens(d.seq_id)
            if d.start_pos > have:
                raise ValueError(
                    f"sequence {d.seq_id}: delta starts at {d.start_pos} but the cache holds "
                    f"{have} tokens"
                )
            if d.end_pos > self.max_model_len:
                raise ValueError(
                    f"sequence {d.seq_id}: {d.end_pos} tokens exceed max_model_len "
                    f"{self.max_model_len}"
                )
            self.kv.truncate(d.seq_id, d.start_pos)
            slots.extend(self.kv.append(d.seq_id, len(d.token_ids)))
            input_ids.extend(d.token_ids)
            positions.extend(range(d.start_pos, d.end_pos))
            q_start.append(q_start[-1] + len(d.token_ids))
            seq_lens.append(d.end_pos)
        return self._build(deltas, input_ids, positions, slots, q_start, seq_lens, causal)

    def _build(
        self,
        deltas: Sequence[Delta],
        input_ids: list[int],
        positions: list[int],
        slots: list[int],
        q_start: list[int],
        seq_lens: list[int],
        causal: bool,
    ) -> PreparedBatch:
        tables = [self.kv.block_table(d.seq_id) for d in deltas]
        width = max(max((len(t) for t in tables), default=1), 1)
        padded = [t + [0] * (width - len(t)) for t in tables]
        # NOTE: one asynchronous copy for the whole step; the host does not wait for the device.
        ids, pos, slot, q_loc, lens, flat_tables = to_device_ints(
            [input_ids, positions, slots, q_start, seq_lens, [i for t in padded for i in t]],
            self.device,
        )
        q_lens = [b - a for a, b in zip(q_start[:-1], q_start[1:], strict=True)]
        md = AttentionMetadata(
            slot_mapping=slot,
            query_start_loc=q_loc,
            seq_lens=lens,
            block_tables=flat_tables.view(len(tables), width),
            max_query_len=max(q_lens, default=0),
            max_seq_len=max(seq_lens, default=0),
            causal=causal,
            query_lens_cpu=q_lens,
            seq_lens_cpu=seq_lens,
        )
        return PreparedBatch(
            input_ids=ids,
            positions=pos,
            attn_metadata=md,
            query_start_loc=q_start,
            seq_ids=[d.seq_id for d in deltas],
        )

    # -- forward ----------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(
        self,
        batch: PreparedBatch,
        *,
        aux_layer_ids: tuple[int, ...] = (),
        intermediate: IntermediateTensors | None = None,
        **model_kwargs: Any,
    ) -> ModelOutput:
        """One forward over the prepared batch. Outputs of a replayed CUDA graph are views of
        its static buffers: read them before the next forward."""
        if self.graph_runner is not None and intermediate is None and not model_kwargs:
            out = self.graph_runner.run(batch, aux_layer_ids)
            if out is not None:
                return out
        ctx = ForwardContext(batch.attn_metadata, self.kv_caches, self.attn_backend)
        pp = get_pp_group()
        if pp.size > 1 and not model_kwargs:
            return self._forward_pipelined(batch, aux_layer_ids, ctx)
        with forward_context(ctx):
            if model_kwargs:
                return self.model(batch.input_ids, batch.positions, **model_kwargs)
            return self.model(
                batch.input_ids,
                batch.positions,
                intermediate=intermediate,
                aux_layer_ids=aux_layer_ids,
            )

    def _forward_pipelined(
        self, batch: PreparedBatch, aux_layer_ids: tuple[int, ...], ctx: ForwardContext
    ) -> ModelOutput:
        """Receive from the previous stage, run this stage, send on; then every stage gets the
        last stage's final hidden states and aux states (SPMD: all ranks see one result)."""
        pp = get_pp_group()
        t = int(batch.input_ids.shape[0])
        h = int(self.hf_config.hidden_size)
        ids = sorted(set(aux_layer_ids))
        intermediate, aux = None, {}
        if pp.rank > 0:
            before = [i for i in ids if i < self.start_layer]
            intermediate, aux = recv_stage_input(pp, t, h, self.dtype, self.device, before)
        with forward_context(ctx):
            out = self.model(
                batch.input_ids,
                batch.positions,
                intermediate=intermediate,
                aux_layer_ids=aux_layer_ids,
            )
        aux.update(out.aux_hidden_states)
        if pp.rank < pp.size - 1:
            send_stage_output(pp, out, aux, [i for i in ids if i < self.end_layer])
        final = out.hidden_states
        if final is None:
            final = torch.empty(t, h, dtype=self.dtype, device=self.device)
        broadcast_from_last(pp, final)
        for i in ids:
            if i not in aux:
                aux[i] = torch.empty(t, h, dtype=self.dtype, device=self.device)
            broadcast_from_last(pp, aux[i])
        return ModelOutput(final, None, aux)

    @torch.inference_mode()
    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        pp = get_pp_group()
        if pp.size == 1:
            return self.model.compute_logits(hidden_states)
        if pp.rank == pp.size - 1:
            logits = self.model.compute_logits(hidden_states).contiguous()
        else:
            n, v = int(hidden_states.shape[0]), int(self.hf_config.vocab_size)
            logits = torch.empty(n, v, dtype=self.dtype, device=self.device)
        return broadcast_from_last(pp, logits)

    def release(self, seq_ids: Sequence[int]) -> None:
        for seq_id in seq_ids:
            self.kv.free(seq_id)

    # -- introspection ----------------------------------------------------------------------
    def kv_usage(self) -> dict[str, int]:
        return {
            "num_blocks": self.num_blocks,
            "num_used_blocks": self.kv.num_used_blocks,
            "block_size": self.block_size,
            "num_seqs": len(self.kv.seq_ids()),
        }
