"""``outrider bench-kernels``: GPU step timings next to their floors, at real model shapes.

It first measures the device: copy bandwidth (a 1 GiB device-to-device copy, bytes read plus
written over time) and the bf16 matmul rate (an 8192³ GEMM). Then, on random bf16 weights built
directly on the GPU (``workers/models/random_init.py``) at Llama-3.1-8B and Qwen3-30B-A3B
shapes, it times with CUDA graphs:

* ``attention``: one layer's KV write + paged attention (the resolved backend) for a decode
  step (1 query token per sequence) and a verify step (``--verify-tokens``, causal among
  themselves) at ``--context`` cached tokens;
* ``moe``: one sparse MoE block (router + the resolved ``moe`` backend) at the token counts of
  those steps;
* ``layer``: one decoder layer step (norms, fused QKV, rotary, attention, fused gate/up, MLP or
  MoE), timed over two consecutive layers;
* ``model``: the full step (forward + logits) through the ModelRunner and its CUDA graphs, for
  ``--model-shape`` at ``--model-batch-sizes`` (history K/V are the cache's zeros: attention
  time does not depend on the values).

Each time is printed next to its floor (``cluster/bench_floors.py``); ratio = measured / floor.
Times are medians over repeated replays; ops whose inputs would sit in L2 rotate over several
input sets inside one graph. Ops whose backend does not declare ``cuda_graph_safe`` are timed
eagerly and marked so.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from outrider.cluster.bench_floors import (
    Cost,
    ModelShape,
    attention_cost,
    expected_active_experts,
    layer_cost,
    model_cost,
    moe_cost,
)
from outrider.cluster.cli import _EXTRA_COMMANDS, CliError

PARTS = ("attention", "moe", "layer", "model")
# NOTE: the keys of workers.models.random_init.SHAPES (imported lazily: it imports torch).
SHAPE_NAMES = ("llama8b", "qwen3moe")
BLOCK_SIZE = 16
COPY_BYTES = 1 << 30
GEMM_N = 8192
# NOTE: inputs of one timed op rotate over at least this many bytes (an H100/H200 L2 is 50 MB).
ROTATE_BYTES = 256 << 20
MAX_SETS = 64
MOE_SETS = 8
LAYERS_PER_LAYER_STEP = 2
# Acceptance targets of the full-model rows at batch 1.
DECODE_FLOOR_TARGET = 1.25
VERIFY_OVER_DECODE_TARGET = 1.1


# ---------------------------------------------------------------------------------------------
# arguments
# ---------------------------------------------------------------------------------------------
def _csv(kind: str, choices: Sequence[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"{kind} list must not be empty")
        bad = [t for t in items if t not in choices]
        if bad:
            raise argparse.ArgumentTypeError(
                f"unknown {kind} {bad[0]!r}; choices: {', '.join(choices)}"
            )
        return items

    return parse


def _positive_ints(text: str) -> list[int]:
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"batch sizes must be comma-separated integers, got {text!r}"
        ) from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"batch sizes must be integers >= 1, got {text!r}")
    return values


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench-kernels",
        help="time attention, MoE, layer and model steps on the GPU against their floors",
        description="GPU step timings next to their floors at real model shapes (CUDA only).",
    )
    names = list(SHAPE_NAMES)
    p.add_argument("--shapes", type=_csv("shape", names), default=names, help=",".join(names))
    p.add_argument("--batch-sizes", type=_positive_ints, default=[1, 8, 64])
    p.add_argument("--context", type=int, default=4096, help="cached tokens per sequence")
    p.add_argument(
        "--verify-tokens", type=int, default=5, help="query tokens of a verify step (k + 1)"
    )
    p.add_argument("--parts", type=_csv("part", PARTS), default=list(PARTS), help=",".join(PARTS))
    p.add_argument("--attention-backend", default="auto", help="registry name (default: auto)")
    p.add_argument("--moe-backend", default="auto", help="registry name (default: auto)")
    p.add_argument("--model-shape", choices=names, default="llama8b")
    p.add_argument("--model-batch-sizes", type=_positive_ints, default=[1])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="OUT", help="write every row and the device figures here")
    p.set_defaults(func=cmd_bench_kernels)


def check_args(args: argparse.Namespace) -> None:
    if args.context < 1:
        raise CliError(f"--context must be >= 1, got {args.context}")
    if not 2 <= args.verify_tokens <= 33:
        raise CliError(f"--verify-tokens must be in [2, 33], got {args.verify_tokens}")


_EXTRA_COMMANDS.append(add_parser)


# ---------------------------------------------------------------------------------------------
# rows
# ---------------------------------------------------------------------------------------------
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


def acceptance(rows: list[Row], q_verify: int) -> list[str]:
    """The two targets at batch 1, as lines to print."""
    by_q = {r.query_len: r for r in rows if r.part == "model" and r.batch == 1}
    if 1 not in by_q:
        return []
    decode = by_q[1]
    ok = decode.ratio <= DECODE_FLOOR_TARGET
    lines = [
        f"decode step at batch 1: x{decode.ratio:.2f} of its floor "
        f"(target <= {DECODE_FLOOR_TARGET}): {'met' if ok else 'MISSED'}"
    ]
    if q_verify in by_q:
        v = by_q[q_verify].ms / decode.ms
        ok = v <= VERIFY_OVER_DECODE_TARGET
        lines.append(
            f"verify of {q_verify} tokens / decode at batch 1: x{v:.3f} "
            f"(target <= {VERIFY_OVER_DECODE_TARGET}): {'met' if ok else 'MISSED'}"
        )
    return lines


# ---------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------
def median_ms(
    fn: Callable[[], Any], device: Any, *, reps: int = 15, sample_ms: float = 5.0
) -> float:
    """Median milliseconds per call; each sample times enough back-to-back calls to last about
    ``sample_ms`` (between two CUDA events on a GPU)."""
    import torch

    if torch.device(device).type != "cuda":
        fn()
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    inner = max(1, math.ceil(sample_ms / max(start.elapsed_time(end), 1e-3)))
    samples = []
    for _ in range(reps):
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / inner)
    return statistics.median(samples)


def capture(fn: Callable[[], Any]) -> Callable[[], None]:
    """A CUDA graph of ``fn`` (warmed up on a side stream); returns its replay."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def time_calls(calls: list[Callable[[], Any]], graph: bool, device: Any) -> float:
    """Median ms per call of one pass over ``calls`` (one graph holding them all, or eager)."""

    def run_all() -> None:
        for c in calls:
            c()

    return median_ms(capture(run_all) if graph else run_all, device) / len(calls)


def copy_bandwidth() -> float:
    """Bytes per second of a 1 GiB device-to-device copy, bytes read plus written."""
    import torch

    src = torch.empty(COPY_BYTES, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), "cuda", reps=10, sample_ms=20.0)
    return 2 * COPY_BYTES / (ms * 1e-3)


def matmul_rate() -> float:
    """FLOP/s of a bf16 ``8192 x 8192 x 8192`` GEMM."""
    import torch

    a = torch.randn(GEMM_N, GEMM_N, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(GEMM_N, GEMM_N, device="cuda", dtype=torch.bfloat16)
    c = torch.empty_like(a)
    ms = median_ms(lambda: torch.matmul(a, b, out=c), "cuda", reps=10, sample_ms=20.0)
    return 2.0 * GEMM_N**3 / (ms * 1e-3)


def count_kernels(fn: Callable[[], Any], device: Any) -> int | None:
    """Device kernels and copies one eager call launches (torch profiler); None if unknown."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    if torch.device(device).type != "cuda":
        return None
    try:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        count = sum(1 for e in prof.events() if e.device_type == DeviceType.CUDA)
    except (RuntimeError, AssertionError):
        return None
    return count or None


def _graph_safe(backend: Any) -> bool:
    return bool(getattr(backend, "cuda_graph_safe", False))


# ---------------------------------------------------------------------------------------------
# the parts
# ---------------------------------------------------------------------------------------------
def _step_metadata(batch: int, context: int, q: int, first_block: int, device: Any) -> Any:
    """Metadata of one step: ``batch`` sequences of ``context`` cached tokens and ``q`` new
    ones, over shuffled blocks numbered from ``first_block``."""
    import torch

    from outrider.kernels.attention.metadata import AttentionMetadata

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
    import torch

    from outrider.kernels import registry

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
    graph = _graph_safe(backend) and torch.device(dev.device).type == "cuda"
    ms = time_calls(calls, graph, dev.device)
    note = f"{backend_name}, {sets} input sets" + ("" if _graph_safe(backend) else ", not safe")
    return make_row(dev, "attention", shape, batch, q, context, ms, cost, graph, note=note)


def bench_moe(
    dev: Device, shape: ModelShape, config: dict[str, Any], tokens: int, moe_backend: str
) -> Row:
    import torch

    from outrider.workers.models.qwen3_moe import Qwen3MoeSparseMoeBlock
    from outrider.workers.models.random_init import default_dtype, init_random_, make_hf_config

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
        safe = _graph_safe(block.experts.kernel)
        graph = safe and torch.device(dev.device).type == "cuda"
        ms = time_calls([lambda x=x: block(x) for x in xs], graph, dev.device)
    cost = moe_cost(shape, tokens, mean_hit, dev.elt)
    note = f"{tokens} tokens, {mean_hit:.1f} experts hit, {moe_backend}"
    note += "" if safe else " (not graph-safe)"
    return make_row(dev, "moe", shape, tokens, 1, 0, ms, cost, graph, note=note)


def bench_layer(
    dev: Device, shape: ModelShape, model: Any, batch: int, context: int, q: int, backend: Any
) -> Row:
    """Two consecutive decoder layers, each over its own KV cache; the time per layer."""
    import torch

    from outrider.workers.forward_context import ForwardContext, forward_context
    from outrider.workers.kv_cache import allocate_kv_caches
    from outrider.workers.layers.moe import FusedMoE

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
    safe = _graph_safe(backend) and all(_graph_safe(k) for k in moe_kernels)
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
    import torch

    from outrider.workers.config import CacheConfig, KernelConfig, ModelConfig, WorkerConfig
    from outrider.workers.cuda_graph import graph_blockers
    from outrider.workers.models.random_init import random_builder
    from outrider.workers.protocol import Delta
    from outrider.workers.runner import ModelRunner

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


def run_parts(
    dev: Device,
    shapes: dict[str, dict[str, Any]],
    args: argparse.Namespace,
    attention_backend: str,
    moe_backend: str,
) -> list[Row]:
    """Every requested part for every shape in ``args.shapes`` (configs from ``shapes``)."""
    import torch

    from outrider.kernels import registry
    from outrider.workers.models.random_init import build_random_model

    def free() -> None:
        if torch.device(dev.device).type == "cuda":
            torch.cuda.empty_cache()

    rows: list[Row] = []
    qs = (1, args.verify_tokens)
    for name in args.shapes:
        shape = ModelShape.from_config(name, shapes[name])
        if "attention" in args.parts:
            for b in args.batch_sizes:
                for q in qs:
                    rows.append(bench_attention(dev, shape, b, args.context, q, attention_backend))
                    free()
        if "moe" in args.parts and shape.is_moe:
            for tokens in sorted({b * q for b in args.batch_sizes for q in qs}):
                rows.append(bench_moe(dev, shape, shapes[name], tokens, moe_backend))
                free()
        if "layer" in args.parts:
            model, _ = build_random_model(
                shapes[name], device=dev.device, dtype=torch.bfloat16, moe_backend=moe_backend,
                num_hidden_layers=LAYERS_PER_LAYER_STEP, seed=args.seed,
            )  # fmt: skip
            backend = registry.get("attention", attention_backend)
            for b in args.batch_sizes:
                for q in qs:
                    rows.append(bench_layer(dev, shape, model, b, args.context, q, backend))
            del model
            free()
    if "model" in args.parts:
        name = args.model_shape
        shape = ModelShape.from_config(name, shapes[name])
        rows += bench_model(
            dev, shape, shapes[name], args.model_batch_sizes, args.context, args.verify_tokens,
            args.seed, attention_backend, moe_backend,
        )  # fmt: skip
    return rows


def cmd_bench_kernels(args: argparse.Namespace) -> int:
    check_args(args)
    import torch

    if not torch.cuda.is_available():
        raise CliError("bench-kernels needs a CUDA device")
    from outrider.kernels import registry
    from outrider.workers.models.random_init import SHAPES

    torch.manual_seed(args.seed)
    cuda = torch.device("cuda")
    dev = Device(torch.cuda.get_device_name(cuda), copy_bandwidth(), matmul_rate(), cuda)
    attn = registry.resolve("attention", args.attention_backend, cuda, torch.bfloat16)
    moe = registry.resolve("moe", args.moe_backend, cuda, torch.bfloat16)
    print(f"device {dev.name}; torch {torch.__version__}; attention {attn}, moe {moe}")
    print(
        f"copy bandwidth {dev.bandwidth / 1e9:.0f} GB/s (read + write, 1 GiB copy); "
        f"bf16 matmul {dev.matmul_rate / 1e12:.0f} TFLOP/s ({GEMM_N}^3)"
    )
    print("floor = max(bytes / copy bandwidth, FLOPs / matmul rate); x = time / floor")
    rows = run_parts(dev, SHAPES, args, attn, moe)
    for line in acceptance(rows, args.verify_tokens):
        print(line)
    if args.json:
        record = {
            "device": dev.name,
            "torch": torch.__version__,
            "attention_backend": attn,
            "moe_backend": moe,
            "copy_bandwidth_bytes_per_s": dev.bandwidth,
            "matmul_flops_per_s": dev.matmul_rate,
            "context": args.context,
            "verify_tokens": args.verify_tokens,
            "rows": [asdict(r) for r in rows],
        }
        with open(args.json, "w") as fh:
            json.dump(record, fh, indent=1)
        print(f"wrote {args.json}")
    return 0
