"""The steps ``outrider bench-kernels`` times: attention, MoE block, decoder layer, full model.

Each returns a ``Row``: the measured time next to its floor (``bench_floors``). Inputs are
random bf16 on ``Device.device``; ops whose backend declares ``cuda_graph_safe`` run inside
CUDA graphs, and ops whose inputs would sit in L2 rotate over several input sets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from outrider.cluster.bench_floors import (
    Cost,
    ModelShape,
    attention_cost,
    expected_active_experts,
    layer_cost,
    model_cost,
    moe_cost,
)
from outrider.cluster.bench_timing import (
    capture,
    count_kernels,
    format_kernel_times,
    graph_safe,
    kernel_times,
    median_ms,
    time_calls,
)
from outrider.kernels import registry
from outrider.kernels.attention.metadata import AttentionMetadata
from outrider.workers.config import CacheConfig, KernelConfig, ModelConfig, WorkerConfig
from outrider.workers.cuda_graph import graph_blockers
from outrider.workers.forward_context import ForwardContext, forward_context
from outrider.workers.kv_cache import allocate_kv_caches
from outrider.workers.layers.moe import FusedMoE
from outrider.workers.models.qwen3_moe import Qwen3MoeSparseMoeBlock
from outrider.workers.models.random_init import (
    default_dtype,
    init_random_,
    make_hf_config,
    random_builder,
)
from outrider.workers.protocol import Delta
from outrider.workers.runner import ModelRunner

BLOCK_SIZE = 16
# NOTE: inputs of one timed op rotate over at least this many bytes (an H100/H200 L2 is 50 MB).
ROTATE_BYTES = 256 << 20
MAX_SETS = 64
MOE_SETS = 8
LAYERS_PER_LAYER_STEP = 2


@dataclass
class Device:
    name: str
    bandwidth: float  # bytes/s, copy read + write
    matmul_rate: float  # FLOP/s, bf16
    device: Any = "cuda"  # torch.device; "cpu" only in the CPU smoke test
    elt: int = 2  # bf16


@dataclass
class Row:
    part: str
    shape: str
    batch: int  # sequences (tokens for a moe row)
    query_len: int
    context: int
    ms: float
    floor_ms: float
    ratio: float
    bound: str
    bytes: float
    flops: float
    graph: bool
    note: str = ""
    eager_ms: float | None = None
    kernels: int | None = None


def make_row(
    dev: Device,
    part: str,
    shape: ModelShape,
    batch: int,
    q: int,
    context: int,
    ms: float,
    cost: Cost,
    graph: bool,
    **extra: Any,
) -> Row:
    floor_ms = cost.floor_s(dev.bandwidth, dev.matmul_rate) * 1e3
    bound = cost.bound(dev.bandwidth, dev.matmul_rate)
    row = Row(part, shape.name, batch, q, context, ms, floor_ms, ms / floor_ms, bound,
              cost.bytes, cost.flops, graph, **extra)  # fmt: skip
    print(format_row(row), flush=True)
    return row


def format_row(r: Row) -> str:
    what = f"{r.part:9s} {r.shape:9s} b={r.batch:<3d} q={r.query_len:<2d} ctx={r.context:<5d}"
    text = (
        f"{what} {r.ms * 1e3:10.1f} us  floor {r.floor_ms * 1e3:10.1f} us ({r.bound:7s})"
        f"  x{r.ratio:5.2f}  {'graph' if r.graph else 'eager'}"
    )
    if r.eager_ms is not None:
        text += f" (eager {r.eager_ms * 1e3:.1f} us)"
    if r.kernels is not None:
        text += f" {r.kernels} kernels/step"
    return text + (f"  {r.note}" if r.note else "")


def _step_metadata(batch: int, context: int, q: int, first_block: int, device: Any) -> Any:
    """Metadata of one step: ``batch`` sequences of ``context`` cached tokens and ``q`` new
    ones, over shuffled blocks numbered from ``first_block``."""
    per_seq = -(-(context + q) // BLOCK_SIZE)
    tables = first_block + torch.randperm(batch * per_seq).view(batch, per_seq)  # [B, blocks]
    pos = torch.arange(context, context + q)  # [q]
    slots = tables[:, pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE  # [B, q]
    return AttentionMetadata(
        slot_mapping=slots.reshape(-1).to(device),
        query_start_loc=(torch.arange(batch + 1) * q).to(device),
        seq_lens=torch.full((batch,), context + q, dtype=torch.int64).to(device),
        block_tables=tables.to(device),
        max_query_len=q,
        max_seq_len=context + q,
        query_lens_cpu=[q] * batch,
        seq_lens_cpu=[context + q] * batch,
    )


def bench_attention(
    dev: Device, shape: ModelShape, batch: int, context: int, q: int, backend_name: str
) -> Row:
    backend = registry.get("attention", backend_name)
    cost = attention_cost(shape, batch, context, q, dev.elt)
    sets = max(2, min(MAX_SETS, -(-ROTATE_BYTES // int(cost.bytes))))
    per_set = batch * -(-(context + q) // BLOCK_SIZE)
    mds = [_step_metadata(batch, context, q, s * per_set, dev.device) for s in range(sets)]
    nkv, nh, hd = shape.num_kv_heads, shape.num_heads, shape.head_dim
    bf16 = dict(device=dev.device, dtype=torch.bfloat16)
    kc = torch.randn(sets * per_set, BLOCK_SIZE, nkv, hd, **bf16)  # [N, bs, nKV, hd]
    vc = torch.randn_like(kc)
    t = batch * q
    calls = []
    for md in mds:
        qt = torch.randn(t, nh, hd, **bf16)
        kt, vt = torch.randn(t, nkv, hd, **bf16), torch.randn(t, nkv, hd, **bf16)
        calls.append(
            lambda qt=qt, kt=kt, vt=vt, md=md: backend.forward(qt, kt, vt, kc, vc, md, hd**-0.5)
        )
    graph = graph_safe(backend) and torch.device(dev.device).type == "cuda"
    ms = time_calls(calls, graph, dev.device)
    note = f"{backend_name}, {sets} input sets" + ("" if graph_safe(backend) else ", not safe")
    return make_row(dev, "attention", shape, batch, q, context, ms, cost, graph, note=note)


def bench_moe(
    dev: Device, shape: ModelShape, config: dict[str, Any], tokens: int, moe_backend: str
) -> Row:
    with default_dtype(torch.bfloat16), torch.device(dev.device):
        block = Qwen3MoeSparseMoeBlock(make_hf_config(config), moe_backend).eval()
    init_random_(block)
    xs = [
        torch.randn(tokens, shape.hidden_size, device=dev.device, dtype=torch.bfloat16)
        for _ in range(MOE_SETS)
    ]
    with torch.inference_mode():
        hit = []
        for x in xs:
            _, ids = block.experts._select_experts(block.gate(x), shape.top_k, True)
            hit.append(int(ids.unique().numel()))
        mean_hit = sum(hit) / len(hit)
        safe = graph_safe(block.experts.kernel)
        graph = safe and torch.device(dev.device).type == "cuda"
        ms = time_calls([lambda x=x: block(x) for x in xs], graph, dev.device)
        one = capture(lambda: block(xs[0])) if graph else (lambda: block(xs[0]))
        breakdown = kernel_times(one, dev.device)
    if breakdown:
        print(f"moe       {shape.name:9s} {tokens} tokens: kernels per block")
        print("\n".join(format_kernel_times(breakdown, top=8)))
    cost = moe_cost(shape, tokens, mean_hit, dev.elt)
    note = f"{tokens} tokens, {mean_hit:.1f} experts hit, {moe_backend}"
    note += "" if safe else " (not graph-safe)"
    return make_row(dev, "moe", shape, tokens, 1, 0, ms, cost, graph, note=note)


def bench_layer(
    dev: Device, shape: ModelShape, model: Any, batch: int, context: int, q: int, backend: Any
) -> Row:
    """Two consecutive decoder layers, each over its own KV cache; the time per layer."""
    md = _step_metadata(batch, context, q, 0, dev.device)
    blocks = batch * -(-(context + q) // BLOCK_SIZE)
    caches = allocate_kv_caches(
        LAYERS_PER_LAYER_STEP, blocks, BLOCK_SIZE, shape.num_kv_heads, shape.head_dim,
        torch.bfloat16, torch.device(dev.device),
    )  # fmt: skip
    t = batch * q
    hidden = torch.randn(t, shape.hidden_size, device=dev.device, dtype=torch.bfloat16)
    positions = torch.arange(context, context + q, device=dev.device).repeat(batch)  # [T]
    layers = list(model.model.layers)[:LAYERS_PER_LAYER_STEP]

    def step() -> None:
        with forward_context(ForwardContext(md, caches, backend)):
            h, r = hidden, None
            # NOTE: a fresh positions view per step, as in a model forward (rotary looks its
            # cos/sin up once per positions tensor).
            pos = positions[:]
            for layer in layers:
                h, r = layer(pos, h, r)

    moe_kernels = [m.kernel for m in model.modules() if isinstance(m, FusedMoE)]
    safe = graph_safe(backend) and all(graph_safe(k) for k in moe_kernels)
    graph = safe and torch.device(dev.device).type == "cuda"
    with torch.inference_mode():
        ms = time_calls([step], graph, dev.device) / LAYERS_PER_LAYER_STEP
    hit = expected_active_experts(shape.num_experts, shape.top_k, t) if shape.is_moe else 0.0
    cost = layer_cost(shape, batch, context, q, dev.elt, hit)
    notes = [f"{hit:.1f} experts expected"] if shape.is_moe else []
    notes += [] if safe else ["not graph-safe"]
    return make_row(dev, "layer", shape, batch, q, context, ms, cost, graph, note=", ".join(notes))


def bench_model(
    dev: Device,
    shape: ModelShape,
    config: dict[str, Any],
    batch_sizes: list[int],
    context: int,
    q_verify: int,
    seed: int = 0,
    attention_backend: str = "auto",
    moe_backend: str = "auto",
) -> list[Row]:
    """The full step (forward + logits) through ModelRunner with its CUDA graphs."""
    per_seq = -(-(context + q_verify) // BLOCK_SIZE)
    cfg = WorkerConfig(
        model=ModelConfig(dtype="bfloat16", max_model_len=per_seq * BLOCK_SIZE),
        kernels=KernelConfig(
            attention_backend=attention_backend,  # type: ignore[arg-type]
            moe_backend=moe_backend,  # type: ignore[arg-type]
            cuda_graph_batch_sizes=sorted(set(batch_sizes)),
            cuda_graph_max_query_len=q_verify,
        ),
        cache=CacheConfig(block_size=BLOCK_SIZE, num_blocks=max(batch_sizes) * per_seq),
        device=str(torch.device(dev.device)),
    )
    runner = ModelRunner(cfg, group="target", build=random_builder(config, seed=seed))
    gr = runner.graph_runner
    note = ""
    if gr is None:
        note = "graphs off: " + "; ".join(graph_blockers(runner.model, runner.attn_backend))
    runner.capture_cuda_graphs([1, q_verify])
    rows: list[Row] = []
    for b in batch_sizes:
        for s in range(b):
            runner.kv.truncate(s, 0)
            runner.kv.append(s, context)  # the history: the cache's zero K/V
        times = {}
        for q in (1, q_verify):
            tokens = [[(1000 + s) % shape.vocab_size] * q for s in range(b)]
            batch = runner.prepare([Delta(s, context, tokens[s]) for s in range(b)])

            def step(batch: Any = batch) -> None:
                out = runner.forward(batch)
                assert out.hidden_states is not None
                runner.compute_logits(out.hidden_states)

            before = gr.num_replays if gr is not None else 0
            ms = median_ms(step, dev.device, reps=10, sample_ms=50.0)
            replayed = gr is not None and gr.num_replays > before
            breakdown = kernel_times(step, dev.device)
            if breakdown:
                print(f"model     {shape.name:9s} b={b:<3d} q={q}: kernels per step")
                print("\n".join(format_kernel_times(breakdown)))
            runner.graph_runner = None
            eager_ms = median_ms(step, dev.device, reps=5, sample_ms=50.0)
            kernels = count_kernels(step, dev.device)
            runner.graph_runner = gr
            cost = model_cost(shape, b, context, q, dev.elt)
            extra = dict(note=note, eager_ms=eager_ms, kernels=kernels)
            rows.append(make_row(dev, "model", shape, b, q, context, ms, cost, replayed, **extra))
            times[q] = ms
        ratio = times[q_verify] / times[1]
        print(f"model     {shape.name:9s} b={b:<3d} verify {q_verify} / decode 1: x{ratio:.3f}")
    return rows
