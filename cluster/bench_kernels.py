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

Each time is printed next to its floor (``bench_floors.py``); ratio = measured / floor. The
steps are in ``bench_steps.py``, the timers in ``bench_timing.py``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from outrider.cluster.bench_floors import ModelShape
from outrider.cluster.cli import _EXTRA_COMMANDS, CliError

if TYPE_CHECKING:
    from outrider.cluster.bench_steps import Device, Row

PARTS = ("attention", "moe", "layer", "model")
# NOTE: the keys of workers.models.random_init.SHAPES; the GPU modules (bench_steps,
# bench_timing, random_init) import torch, so the command imports them when it runs.
SHAPE_NAMES = ("llama8b", "qwen3moe")
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


def run_parts(
    dev: Device,
    shapes: dict[str, dict[str, Any]],
    args: argparse.Namespace,
    attention_backend: str,
    moe_backend: str,
) -> list[Row]:
    """Every requested part for every shape in ``args.shapes`` (configs from ``shapes``)."""
    import torch

    from outrider.cluster.bench_steps import (
        LAYERS_PER_LAYER_STEP,
        bench_attention,
        bench_layer,
        bench_model,
        bench_moe,
    )
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
    from outrider.cluster.bench_steps import Device
    from outrider.cluster.bench_timing import GEMM_N, copy_bandwidth, matmul_rate
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
